package mirrorpath

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/canary"
	"github.com/fleetmirror/fleetmirror/agent/canary/canarystatus"
)

// TestVerdictIsCanaryStatus holds the operator to what the agent serves:
// a Status encoded by agent/canary decodes into the same Verdict (the
// wire names themselves are pinned in canarystatus).
func TestVerdictIsCanaryStatus(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Second)
	in := canary.Status{Verdict: canarystatus.Failed, OK: false, Step: canary.StepPull, Reason: "r", LastRun: &now, LastOK: &now, Requests: 3, Interval: "5m"}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var v Verdict
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(v, Verdict(in)) {
		t.Errorf("decoded %+v from %s; want %+v", v, b, in)
	}
}
