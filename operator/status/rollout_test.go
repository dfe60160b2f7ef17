package status

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fleetmirror/fleetmirror/operator/chartlabels"
)

func ds(comp string, gen, obs int64, desired, updated, ready int32) appsv1.DaemonSet {
	return appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "spegel-" + comp, Generation: gen, Labels: map[string]string{chartlabels.Component: comp}},
		Status:     appsv1.DaemonSetStatus{ObservedGeneration: obs, DesiredNumberScheduled: desired, UpdatedNumberScheduled: updated, NumberReady: ready},
	}
}

func TestEvaluate(t *testing.T) {
	both := []string{ComponentAgent, ComponentPrep}
	for _, tc := range []struct {
		name      string
		dss       []appsv1.DaemonSet
		want      []string
		ready     bool
		reason    string
		nodes     Nodes
		inMessage string
	}{
		{"rolled out", []appsv1.DaemonSet{ds(ComponentAgent, 2, 2, 3, 3, 3)}, []string{ComponentAgent}, true, "RolloutComplete", Nodes{3, 3, 3}, "3 of 3"},
		{"prep missing", []appsv1.DaemonSet{ds(ComponentAgent, 1, 1, 3, 3, 3)}, both, false, "DaemonSetMissing", Nodes{3, 3, 3}, "containerd-prep"},
		{"prep not ready", []appsv1.DaemonSet{ds(ComponentAgent, 1, 1, 3, 3, 3), ds(ComponentPrep, 1, 1, 3, 3, 1)}, both, false, "RolloutInProgress", Nodes{3, 3, 3}, "1 ready"},
		{"old generation", []appsv1.DaemonSet{ds(ComponentAgent, 2, 1, 3, 3, 3)}, []string{ComponentAgent}, false, "RolloutInProgress", Nodes{3, 3, 3}, "not yet seen"},
		{"updating", []appsv1.DaemonSet{ds(ComponentAgent, 2, 2, 3, 1, 3)}, []string{ComponentAgent}, false, "RolloutInProgress", Nodes{3, 1, 3}, "1 of 3 nodes updated"},
		{"no nodes", []appsv1.DaemonSet{ds(ComponentAgent, 1, 1, 0, 0, 0)}, []string{ComponentAgent}, false, "NoNodes", Nodes{}, "no node"},
		{"cleanup hook ignored", []appsv1.DaemonSet{ds(ComponentAgent, 1, 1, 2, 2, 2), ds("cleanup", 1, 1, 2, 0, 0)}, []string{ComponentAgent}, true, "RolloutComplete", Nodes{2, 2, 2}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Evaluate(tc.dss, tc.want)
			if r.Ready != tc.ready || r.Reason != tc.reason || r.Nodes != tc.nodes || !strings.Contains(r.Message, tc.inMessage) {
				t.Fatalf("got %+v, want ready=%v reason=%s nodes=%+v message containing %q", r, tc.ready, tc.reason, tc.nodes, tc.inMessage)
			}
		})
	}
}

func TestSetConditionKeepsTransitionTime(t *testing.T) {
	conds := []any{map[string]any{"type": "Deployed", "status": "True"}, map[string]any{"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}}
	out := setCondition(conds, "Ready", true, "RolloutComplete", "ok")
	if got := out[1].(map[string]any)["lastTransitionTime"]; got != "2020-01-01T00:00:00Z" {
		t.Fatalf("transition time changed without a status change: %v", got)
	}
	out = setCondition(conds, "Ready", false, "RolloutInProgress", "x")
	if got := out[1].(map[string]any)["lastTransitionTime"]; got == "2020-01-01T00:00:00Z" {
		t.Fatal("transition time kept across a status change")
	}
	if len(out) != 2 || out[0].(map[string]any)["type"] != "Deployed" {
		t.Fatalf("other conditions not kept: %v", out)
	}
}
