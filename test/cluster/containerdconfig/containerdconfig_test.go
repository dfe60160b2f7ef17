package containerdconfig

import (
	"slices"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

func TestString(t *testing.T) {
	c := Config{Version: 3, Major: 2, Root: "/r", State: "/s", Socket: "/c.sock", Opt: "/o", NoImports: true,
		DebugLevel: "info", Disable: []string{"x"}, Plugins: "  [plugins.\"p\"]\n    k = 1\n"}
	var got struct {
		Version  int               `toml:"version"`
		Root     string            `toml:"root"`
		Imports  []string          `toml:"imports"`
		Disabled []string          `toml:"disabled_plugins"`
		TTRPC    map[string]string `toml:"ttrpc"`
		Debug    map[string]string `toml:"debug"`
		Plugins  map[string]any    `toml:"plugins"`
	}
	if err := toml.Unmarshal([]byte(c.String()), &got); err != nil {
		t.Fatalf("%v\n%s", err, c)
	}
	if got.Version != 3 || got.Root != "/r" || got.Imports == nil || len(got.Imports) != 0 ||
		got.TTRPC["address"] != "/c.sock.ttrpc" || got.Debug["level"] != "info" ||
		!slices.Contains(got.Disabled, "x") || !slices.Contains(got.Disabled, "io.containerd.nri.v1.nri") ||
		got.Plugins["p"] == nil || got.Plugins["io.containerd.internal.v1.opt"] == nil {
		t.Fatalf("unexpected config %+v:\n%s", got, c)
	}
	if slices.Contains(Disabled(1), "io.containerd.nri.v1.nri") {
		t.Error("1.6 has no NRI plugin to disable")
	}
}
