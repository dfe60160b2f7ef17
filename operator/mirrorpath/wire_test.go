package mirrorpath

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/canary"
)

// TestVerdictIsCanaryStatus holds Verdict to the agent's canary.Status,
// the one definition of GET /canary: every field Verdict reads has the
// same JSON name and type there, and a Status the agent serves decodes
// into the same values. (The operator does not import agent/canary: it
// would link the containerd client into the operator.)
func TestVerdictIsCanaryStatus(t *testing.T) {
	agent := map[string]reflect.StructField{}
	st := reflect.TypeFor[canary.Status]()
	for i := range st.NumField() {
		agent[st.Field(i).Tag.Get("json")] = st.Field(i)
	}
	vt := reflect.TypeFor[Verdict]()
	for i := range vt.NumField() {
		f := vt.Field(i)
		a, ok := agent[f.Tag.Get("json")]
		if !ok || a.Type != f.Type || a.Name != f.Name {
			t.Errorf("Verdict.%s (json %q, %s) has no match in canary.Status", f.Name, f.Tag.Get("json"), f.Type)
		}
	}
	now := time.Now().UTC().Truncate(time.Second)
	in := canary.Status{Verdict: "failed", OK: false, Step: "pull", Reason: "r", LastRun: &now, LastOK: &now, Requests: 3, Interval: "5m"}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var v Verdict
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	want := Verdict{Verdict: in.Verdict, OK: in.OK, Step: in.Step, Reason: in.Reason, LastRun: in.LastRun, LastOK: in.LastOK}
	if !reflect.DeepEqual(v, want) {
		t.Errorf("decoded %+v from %s; want %+v", v, b, want)
	}
}
