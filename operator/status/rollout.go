// Package status reports how a Spegel resource's rollout is going: the
// Ready condition from its DaemonSets, the number of nodes ready, and the
// generation the operator last released.
package status

import (
	"fmt"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"

	"github.com/fleetmirror/fleetmirror/operator/chartlabels"
)

// Components whose DaemonSets count for readiness (the cleanup hook's
// DaemonSet does not).
const (
	ComponentAgent = "agent"
	ComponentPrep  = "containerd-prep"
)

// Nodes is the agent DaemonSet's rollout, as shown in status.nodes.
type Nodes struct {
	Desired int64 `json:"desired"`
	Updated int64 `json:"updated"`
	Ready   int64 `json:"ready"`
}

// Rollout is the outcome of Evaluate: how far the DaemonSets rolled out.
type Rollout struct {
	Ready   bool
	Reason  string // searchable: RolloutComplete, RolloutInProgress, DaemonSetMissing, NoNodes
	Message string
	Nodes   Nodes
}

// Evaluate decides readiness from the release's DaemonSets. want lists the
// components that must be there (the agent, and the prep DaemonSet when it
// is enabled). A DaemonSet is rolled out when its controller has seen its
// latest spec and every scheduled node runs the updated, ready pod.
func Evaluate(dss []appsv1.DaemonSet, want []string) Rollout {
	byComp := map[string]appsv1.DaemonSet{}
	for _, ds := range dss {
		byComp[ds.Labels[chartlabels.Component]] = ds
	}
	var r Rollout
	if ag, ok := byComp[ComponentAgent]; ok {
		r.Nodes = Nodes{Desired: int64(ag.Status.DesiredNumberScheduled), Updated: int64(ag.Status.UpdatedNumberScheduled), Ready: int64(ag.Status.NumberReady)}
	}
	var missing, waiting []string
	for _, c := range want {
		ds, ok := byComp[c]
		if !ok {
			missing = append(missing, c)
			continue
		}
		st := ds.Status
		switch {
		case st.ObservedGeneration < ds.Generation:
			waiting = append(waiting, fmt.Sprintf("%s: spec change not yet seen by the DaemonSet controller", ds.Name))
		case st.DesiredNumberScheduled == 0:
			waiting = append(waiting, fmt.Sprintf("%s: scheduled on no node (check nodeSelector, tolerations and affinity)", ds.Name))
		case st.UpdatedNumberScheduled < st.DesiredNumberScheduled || st.NumberReady < st.DesiredNumberScheduled:
			waiting = append(waiting, fmt.Sprintf("%s: %d of %d nodes updated, %d ready", ds.Name, st.UpdatedNumberScheduled, st.DesiredNumberScheduled, st.NumberReady))
		}
	}
	sort.Strings(missing)
	switch {
	case len(missing) > 0:
		r.Reason, r.Message = "DaemonSetMissing", "no DaemonSet for "+strings.Join(missing, ", ")+" yet"
	case len(waiting) > 0 && r.Nodes.Desired == 0:
		r.Reason, r.Message = "NoNodes", strings.Join(waiting, "; ")
	case len(waiting) > 0:
		r.Reason, r.Message = "RolloutInProgress", strings.Join(waiting, "; ")
	default:
		r.Ready, r.Reason = true, "RolloutComplete"
		r.Message = fmt.Sprintf("%d of %d nodes ready", r.Nodes.Ready, r.Nodes.Desired)
	}
	return r
}
