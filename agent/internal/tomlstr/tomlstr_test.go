package tomlstr

import (
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// Whatever Basic writes, a TOML parser reads back as the same string.
func TestBasicRoundTrips(t *testing.T) {
	for _, s := range []string{"", "plain", `q"uote`, `back\slash`, "tab\tnew\nline", "del\x7f", "ünïcode", `\u0041`} {
		var v struct{ K string }
		doc := "K = " + Basic(s) + "\n"
		if err := toml.Unmarshal([]byte(doc), &v); err != nil {
			t.Fatalf("%q: %s does not parse: %v", s, doc, err)
		}
		if v.K != s {
			t.Errorf("%q: read back %q from %s", s, v.K, doc)
		}
		if got, want := HasControl(s), s == "tab\tnew\nline" || s == "del\x7f"; got != want {
			t.Errorf("HasControl(%q) = %v, want %v", s, got, want)
		}
	}
}
