// Package readiness holds new nodes back until their agent is ready.
// A node that joins without a ready agent gets the startup taint (or
// registers with it), so the scheduler keeps other pods off it and they
// do not pull from upstream before the node mirrors. The taint comes off
// once the agent pod on that node is Ready: its readiness probe passes
// only with the mirror configuration written and, with containerd-prep,
// the prep check passing. A node that stays held is named, with the
// reason, in the Spegel resource's NodesReady condition and, after
// ReportAfter, in a warning event.
//
// Readiness fails open: the mirror is there for speed, never for
// availability. A node is held at most ReleaseAfter from its creation;
// then the taint comes off whatever its agent says, with a NodeReleased
// warning event, the ReleasedAnnotation and the node named in
// NodesReady, and it is never held again. When the operator is gone, the
// agent removes the taint from its own node past the same bound (package
// agent/nodetaint, authorized by the spegel chart's admission policy).
package readiness

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/fleetmirror/fleetmirror/operator/chartlabels"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
	"github.com/fleetmirror/fleetmirror/operator/spegels"
	"github.com/fleetmirror/fleetmirror/operator/status"
)

const (
	// TaintKey is the startup taint (effect NoSchedule). The spegel
	// chart's pods tolerate it whatever tolerations a resource sets. Node
	// pools may register with it: --register-with-taints=fleetmirror.dev/agent-not-ready=:NoSchedule
	TaintKey = "fleetmirror.dev/agent-not-ready"
	// ReadyAnnotation marks a node whose agent has been ready once. Such
	// a node is never tainted again: an agent upgrade or restart must not
	// hold a working node back.
	ReadyAnnotation = "fleetmirror.dev/agent-ready"
	// ReleasedAnnotation marks a node released past ReleaseAfter without
	// a ready agent (fail open): the time, then the reason.
	ReleasedAnnotation = "fleetmirror.dev/released-unready"
	// ConditionType is the Spegel status condition naming held nodes.
	ConditionType = "NodesReady"
	maxNamed      = 10
)

// Taint is the startup taint.
var Taint = corev1.Taint{Key: TaintKey, Effect: corev1.TaintEffectNoSchedule}

// AgentPods selects the agent pods (and DaemonSets) of every
// helm-charts/spegel release; the manager caches only these pods.
var AgentPods = labels.SelectorFromSet(labels.Set{chartlabels.Name: "spegel", chartlabels.Component: status.ComponentAgent})

// Controller taints and releases nodes. It acts on the one Spegel
// resource that manages the nodes (the oldest); with none, or none
// deployed, it takes its taint off every node so nothing waits forever.
type Controller struct {
	Client   client.Client
	GVK      schema.GroupVersionKind
	Recorder record.EventRecorder
	// ReportAfter: a node held this long gets a warning event.
	ReportAfter time.Duration
	// ReleaseAfter: a node is held at most this long from its creation
	// (default 5m), then released with a warning (fail open).
	ReleaseAfter time.Duration
	// Namespaces the operator manages: a resource elsewhere has no
	// release, so it holds no node.
	Namespaces spegels.Namespaces
	// Resync re-checks this often while nodes are held (default 30s).
	Resync time.Duration

	mu       sync.Mutex
	reported map[string]string // node → the reason its warning gave
}

var everything = types.NamespacedName{Name: "nodes"}

// SetupWithManager registers the controller: any change of a node, an
// agent pod, a DaemonSet or a Spegel resource runs one pass over all
// nodes.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	if c.Resync == 0 {
		c.Resync = 30 * time.Second
	}
	if c.ReleaseAfter == 0 {
		c.ReleaseAfter = 5 * time.Minute
	}
	c.reported = map[string]string{}
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{{NamespacedName: everything}}
	})
	cr := &unstructured.Unstructured{}
	cr.SetGroupVersionKind(c.GVK)
	agents := predicate.NewPredicateFuncs(func(o client.Object) bool { return AgentPods.Matches(labels.Set(o.GetLabels())) })
	return ctrl.NewControllerManagedBy(mgr).
		Named("node-readiness").
		Watches(&corev1.Node{}, all).
		Watches(&corev1.Pod{}, all, builder.WithPredicates(agents)).
		Watches(&appsv1.DaemonSet{}, all, builder.WithPredicates(agents)).
		Watches(cr, all).
		Complete(c)
}

// held is a node kept tainted, and why.
type held struct {
	node   string
	reason string
	since  time.Time
}

// Reconcile implements reconcile.Reconciler: one pass over every node.
func (c *Controller) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	owner, ds, err := c.active(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	var nodes corev1.NodeList
	if err := c.Client.List(ctx, &nodes); err != nil {
		return reconcile.Result{}, fmt.Errorf("listing nodes: %w", err)
	}
	if ds == nil {
		// Nothing would ever make these nodes ready: let them go.
		for i := range nodes.Items {
			if err := c.setNode(ctx, &nodes.Items[i], false, false); err != nil {
				return reconcile.Result{}, err
			}
		}
		return reconcile.Result{}, nil
	}
	pods, err := c.agentPods(ctx, ds)
	if err != nil {
		return reconcile.Result{}, err
	}
	sel := labels.SelectorFromSet(ds.Spec.Template.Spec.NodeSelector)
	var holding, unready []held
	var released []string
	now := time.Now()
	for i := range nodes.Items {
		n := &nodes.Items[i]
		if !sel.Matches(labels.Set(n.Labels)) {
			// The agent never runs there: not ours to hold.
			if err := c.setNode(ctx, n, false, false); err != nil {
				return reconcile.Result{}, err
			}
			continue
		}
		pod := pods[n.Name]
		if ready, _ := podReady(pod); ready {
			if hasTaint(n) {
				released = append(released, n.Name)
			}
			if err := c.setNode(ctx, n, false, true); err != nil {
				return reconcile.Result{}, err
			}
			continue
		}
		if n.Annotations[ReadyAnnotation] != "" {
			continue // was ready once: never held again
		}
		why := heldReason(pod, n)
		h := held{node: n.Name, reason: why, since: n.CreationTimestamp.Time}
		if waited := now.Sub(h.since); waited >= c.ReleaseAfter {
			if !hasTaint(n) && n.Annotations[ReleasedAnnotation] == "" && n.CreationTimestamp.Before(ptr(owner.GetCreationTimestamp())) {
				// Joined before the resource existed: never held, so
				// nothing to release or report (installing on a running
				// cluster must not mark every node).
				continue
			}
			// Fail open: never held past the bound.
			first, err := c.release(ctx, n, why)
			if err != nil {
				return reconcile.Result{}, err
			}
			if first {
				c.Recorder.Eventf(owner, corev1.EventTypeWarning, "NodeReleasedUnready",
					"node %s released after %s without a ready agent (startup taint %s removed; the mirror may not serve it until its agent is ready): %s",
					n.Name, c.ReleaseAfter, TaintKey, why)
			}
			unready = append(unready, h)
			continue
		}
		holding = append(holding, h)
		if err := c.setNode(ctx, n, true, false); err != nil {
			return reconcile.Result{}, err
		}
	}
	for _, n := range released {
		c.Recorder.Eventf(owner, corev1.EventTypeNormal, "NodeReleased", "node %s: agent ready, startup taint %s removed", n, TaintKey)
	}
	next := c.report(owner, holding)
	if err := c.writeCondition(ctx, owner, holding, unready); err != nil {
		return reconcile.Result{}, err
	}
	if len(holding) == 0 {
		return reconcile.Result{}, nil
	}
	for _, h := range holding {
		next = min(next, max(c.ReleaseAfter-now.Sub(h.since), time.Second))
	}
	return reconcile.Result{RequeueAfter: min(next, c.Resync)}, nil
}

// active returns the Spegel resource that manages the nodes and its agent
// DaemonSet, or nil when there is none yet (not deployed).
func (c *Controller) active(ctx context.Context) (*unstructured.Unstructured, *appsv1.DaemonSet, error) {
	owner, err := spegels.Oldest(ctx, c.Client, c.GVK)
	if err != nil {
		return nil, nil, err
	}
	if owner == nil || owner.GetDeletionTimestamp() != nil {
		return nil, nil, nil
	}
	if !c.Namespaces.Manages(owner.GetNamespace()) {
		return owner, nil, nil
	}
	var dss appsv1.DaemonSetList
	if err := c.Client.List(ctx, &dss, client.InNamespace(owner.GetNamespace()), client.MatchingLabels{
		chartlabels.PartOf: chartlabels.Fleetmirror, chartlabels.Instance: owner.GetName(), chartlabels.Component: status.ComponentAgent,
	}); err != nil {
		return nil, nil, fmt.Errorf("listing the agent DaemonSet: %w", err)
	}
	if len(dss.Items) == 0 {
		return owner, nil, nil
	}
	return owner, &dss.Items[0], nil
}

// agentPods maps node name to the agent pod there.
func (c *Controller) agentPods(ctx context.Context, ds *appsv1.DaemonSet) (map[string]*corev1.Pod, error) {
	var pods corev1.PodList
	if err := c.Client.List(ctx, &pods, client.InNamespace(ds.Namespace), client.MatchingLabels(ds.Spec.Selector.MatchLabels)); err != nil {
		return nil, fmt.Errorf("listing agent pods: %w", err)
	}
	out := map[string]*corev1.Pod{}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Spec.NodeName == "" || p.DeletionTimestamp != nil {
			continue
		}
		// Of two (during a rolling update), a ready one counts.
		if prev, ok := out[p.Spec.NodeName]; ok {
			if r, _ := podReady(prev); r {
				continue
			}
		}
		out[p.Spec.NodeName] = p
	}
	return out, nil
}

// podReady says whether the agent pod is Ready and, if not, why.
func podReady(p *corev1.Pod) (bool, string) {
	if p == nil {
		return false, "no agent pod on the node yet (the agent DaemonSet has not scheduled one; check its tolerations and the node's taints)"
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			if c.Status == corev1.ConditionTrue {
				return true, ""
			}
			why := fmt.Sprintf("agent pod %s not ready", p.Name)
			if c.Message != "" {
				why += ": " + c.Message
			}
			for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
				if w := cs.State.Waiting; w != nil && w.Reason != "" {
					why += fmt.Sprintf("; %s %s", cs.Name, w.Reason)
					if w.Message != "" {
						why += " (" + w.Message + ")"
					}
				}
			}
			return false, why + " (see its readiness probe: hosts.toml written, containerd-prep check, the canary)"
		}
	}
	return false, fmt.Sprintf("agent pod %s is %s and has not reported readiness yet", p.Name, p.Status.Phase)
}

// heldReason is why node n is held: its agent pod's state and, when the
// node's mirror path condition is False, the canary's finding. The pod's
// readiness says only that it is not ready; the canary names the broken
// setting and the fix, which is what the warning, the annotation and
// NodesReady must tell.
func heldReason(pod *corev1.Pod, n *corev1.Node) string {
	_, why := podReady(pod)
	for _, c := range n.Status.Conditions {
		if string(c.Type) == mirrorpath.ConditionType && c.Status == corev1.ConditionFalse && c.Message != "" {
			why += "; " + c.Message
		}
	}
	return why
}

func hasTaint(n *corev1.Node) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == TaintKey {
			return true
		}
	}
	return false
}

// setNode puts the taint on or off and, when ready, the ready annotation;
// it writes only when something changes, with optimistic locking.
func (c *Controller) setNode(ctx context.Context, n *corev1.Node, taint, ready bool) error {
	orig := n.DeepCopy()
	var ts []corev1.Taint
	for _, t := range n.Spec.Taints {
		if t.Key != TaintKey {
			ts = append(ts, t)
		}
	}
	if taint {
		ts = append(ts, Taint)
	}
	n.Spec.Taints = ts
	if ready && n.Annotations[ReadyAnnotation] == "" {
		if n.Annotations == nil {
			n.Annotations = map[string]string{}
		}
		n.Annotations[ReadyAnnotation] = time.Now().UTC().Format(time.RFC3339)
	}
	if hasTaint(orig) == taint && (!ready || orig.Annotations[ReadyAnnotation] != "") {
		return nil
	}
	err := c.Client.Patch(ctx, n, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("updating node %s (startup taint %v): %w", n.Name, taint, err)
	}
	return nil
}

// release takes the taint off a node held past ReleaseAfter and marks it
// released; first says whether it was not marked before (so the warning
// is told once, also when the agent's own fallback removed the taint).
func (c *Controller) release(ctx context.Context, n *corev1.Node, why string) (first bool, err error) {
	first = n.Annotations[ReleasedAnnotation] == ""
	if !first && !hasTaint(n) {
		return false, nil
	}
	orig := n.DeepCopy()
	var ts []corev1.Taint
	for _, t := range n.Spec.Taints {
		if t.Key != TaintKey {
			ts = append(ts, t)
		}
	}
	n.Spec.Taints = ts
	if first {
		if n.Annotations == nil {
			n.Annotations = map[string]string{}
		}
		n.Annotations[ReleasedAnnotation] = time.Now().UTC().Format(time.RFC3339) + " " + why
	}
	err = c.Client.Patch(ctx, n, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("releasing node %s held past %s: %w", n.Name, c.ReleaseAfter, err)
	}
	return first, nil
}

// report emits a warning for each node held longer than ReportAfter, once
// per reason (a node first without an agent pod, then with an unready one,
// is told both ways), and returns when the next one is due.
func (c *Controller) report(owner *unstructured.Unstructured, holding []held) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	next := c.Resync
	still := map[string]bool{}
	for _, h := range holding {
		still[h.node] = true
		waited := now.Sub(h.since)
		if waited < c.ReportAfter {
			next = min(next, c.ReportAfter-waited)
			continue
		}
		if c.reported[h.node] != h.reason {
			c.reported[h.node] = h.reason
			c.Recorder.Eventf(owner, corev1.EventTypeWarning, "NodeHeld", "node %s kept its startup taint %s for %s: %s",
				h.node, TaintKey, waited.Round(time.Second), h.reason)
		}
	}
	for n := range c.reported {
		if !still[n] {
			delete(c.reported, n)
		}
	}
	return max(next, time.Second)
}

// name lists nodes with their reasons, at most maxNamed.
func name(hs []held) string {
	sort.Slice(hs, func(i, j int) bool { return hs[i].node < hs[j].node })
	var parts []string
	for i, h := range hs {
		if i == maxNamed {
			parts = append(parts, fmt.Sprintf("and %d more", len(hs)-maxNamed))
			break
		}
		parts = append(parts, h.node+": "+h.reason)
	}
	return strings.Join(parts, "; ")
}

func (c *Controller) writeCondition(ctx context.Context, owner *unstructured.Unstructured, holding, unready []held) error {
	ok, reason, msg := true, "NoNodeHeld", "no node waits for its agent"
	var parts []string
	if len(holding) > 0 {
		reason = "NodesHeld"
		parts = append(parts, fmt.Sprintf("%d node(s) keep the startup taint %s until their agent is ready (at most %s): %s", len(holding), TaintKey, c.ReleaseAfter, name(holding)))
	}
	if len(unready) > 0 {
		if reason != "NodesHeld" {
			reason = "NodesReleasedUnready"
		}
		parts = append(parts, fmt.Sprintf("%d node(s) released after %s without a ready agent (fail open: they run workloads, the mirror may not serve them): %s", len(unready), c.ReleaseAfter, name(unready)))
	}
	if len(parts) > 0 {
		ok, msg = false, strings.Join(parts, ". ")
	}
	orig := owner.DeepCopy()
	conds, _, _ := unstructured.NestedSlice(owner.Object, "status", "conditions")
	if err := unstructured.SetNestedSlice(owner.Object, status.SetCondition(conds, ConditionType, ok, reason, msg), "status", "conditions"); err != nil {
		return err
	}
	patch := client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{})
	if data, err := patch.Data(owner); err == nil && string(data) == "{}" {
		return nil
	}
	err := c.Client.Status().Patch(ctx, owner, patch)
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return fmt.Errorf("status of %s/%s changed meanwhile; retrying", owner.GetNamespace(), owner.GetName())
	}
	return err
}

func ptr[T any](v T) *T { return &v }
