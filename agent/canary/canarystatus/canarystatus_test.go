package canarystatus

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

// TestWireNames pins the JSON of GET /canary: an operator of the previous
// version reads these names from agents of this one, and the other way round.
func TestWireNames(t *testing.T) {
	at := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	in := Status{Verdict: Failed, Step: "pull", Reason: "r", LastRun: &at, LastOK: &at, DurationSeconds: 0.5,
		Requests: 4, Bytes: 2608, Image: "i", Containerd: "2.4.2", Interval: "5m0s", Runs: 7}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"verdict":"failed","ok":false,"step":"pull","reason":"r","lastRun":"2026-11-30T12:00:00Z","lastOK":"2026-11-30T12:00:00Z",` +
		`"durationSeconds":0.5,"requests":4,"bytes":2608,"image":"i","containerd":"2.4.2","interval":"5m0s","runs":7}`
	if string(b) != want {
		t.Errorf("GET /canary changed on the wire:\n got %s\nwant %s", b, want)
	}
	var out Status
	if err := json.Unmarshal([]byte(want), &out); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(out, in) {
		t.Errorf("decoded %+v, want %+v", out, in)
	}
}

func TestKnown(t *testing.T) {
	for _, v := range []string{Pending, OK, Failed, Disabled} {
		if !Known(v) {
			t.Errorf("Known(%q) = false", v)
		}
	}
	if Known("maybe") || Known("") {
		t.Error("an unknown verdict is known")
	}
}
