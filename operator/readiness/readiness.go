// Package readiness holds new nodes back until their agent is ready.
// A node that joins without a ready agent gets the startup taint (or
// registers with it), so the scheduler keeps other pods off it and they
// do not pull from upstream before the node mirrors. The taint comes off
// once the agent pod on that node is Ready: its readiness probe passes
// only with the mirror configuration written and, with containerd-prep,
// the prep check passing. A node that stays held is named, with the
// reason, in the Spegel resource's NodesReady condition and, after
// report-after (WithReportAfter), in a warning event.
//
// Readiness fails open: the mirror is there for speed, never for
// availability. A node is held at most release-after (WithReleaseAfter) from its creation;
// then the taint comes off whatever its agent says, with a NodeReleased
// warning event, the ReleasedAnnotation and the node named in
// NodesReady, and it is never held again. When the operator is gone, the
// agent removes the taint from its own node past the same bound (package
// agent/nodetaint, authorized by the spegel chart's admission policy).
package readiness

import (
	"context"
	"errors"
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
	client   client.Client
	gvk      schema.GroupVersionKind
	recorder record.EventRecorder
	// reportAfter: a node held this long gets a warning event.
	reportAfter time.Duration
	// releaseAfter: a node is held at most this long from its creation,
	// then released with a warning (fail open).
	releaseAfter time.Duration
	// namespaces the operator manages: a resource elsewhere has no
	// release, so it holds no node.
	namespaces spegels.Namespaces
	// resync re-checks this often while nodes are held.
	resync time.Duration

	mu       sync.Mutex
	reported map[string]string // node → the reason its warning gave
}

// Option configures a Controller.
type Option func(*Controller)

// WithReportAfter gives a node held this long a warning event (default 0:
// at once).
func WithReportAfter(d time.Duration) Option { return func(c *Controller) { c.reportAfter = d } }

// WithReleaseAfter holds a node at most d from its creation (default 5m).
func WithReleaseAfter(d time.Duration) Option { return func(c *Controller) { c.releaseAfter = d } }

// WithNamespaces limits the controller to the resources of the namespaces
// the operator manages (default: every namespace).
func WithNamespaces(ns spegels.Namespaces) Option { return func(c *Controller) { c.namespaces = ns } }

// WithResync re-checks this often while nodes are held (default 30s).
func WithResync(d time.Duration) Option { return func(c *Controller) { c.resync = d } }

// New returns a controller for the Spegel resources of kind gvk; events go
// to recorder.
func New(c client.Client, gvk schema.GroupVersionKind, recorder record.EventRecorder, opts ...Option) (*Controller, error) {
	rc := &Controller{client: c, gvk: gvk, recorder: recorder, releaseAfter: 5 * time.Minute, resync: 30 * time.Second, reported: map[string]string{}}
	for _, o := range opts {
		o(rc)
	}
	switch {
	case c == nil:
		return nil, errors.New("readiness: no client")
	case gvk.Kind == "":
		return nil, errors.New("readiness: no kind of resource to act on")
	case recorder == nil:
		return nil, errors.New("readiness: no event recorder")
	case rc.releaseAfter <= 0:
		return nil, errors.New("readiness: release-after must be more than 0 (a node is never held for good)")
	case rc.reportAfter < 0 || rc.resync <= 0:
		return nil, errors.New("readiness: report-after must not be negative, resync must be more than 0")
	}
	return rc, nil
}

var everything = types.NamespacedName{Name: "nodes"}

// SetupWithManager registers the controller: any change of a node, an
// agent pod, a DaemonSet or a Spegel resource runs one pass over all
// nodes.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{{NamespacedName: everything}}
	})
	cr := &unstructured.Unstructured{}
	cr.SetGroupVersionKind(c.gvk)
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
	if err := c.client.List(ctx, &nodes); err != nil {
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
	p := &pass{owner: owner, sel: labels.SelectorFromSet(ds.Spec.Template.Spec.NodeSelector), pods: pods, now: time.Now()}
	for i := range nodes.Items {
		if err := c.visit(ctx, p, &nodes.Items[i]); err != nil {
			return reconcile.Result{}, err
		}
	}
	return c.finish(ctx, p)
}

// pass is one Reconcile's view of the nodes and what it found.
type pass struct {
	owner *unstructured.Unstructured
	sel   labels.Selector // the nodes the agent runs on
	pods  map[string]*corev1.Pod
	now   time.Time

	holding, unready []held
	released         []string // taken off as their agent turned ready
}

// visit decides one node: not the agent's, ready, ready once, held past
// the bound, or held.
func (c *Controller) visit(ctx context.Context, p *pass, n *corev1.Node) error {
	if !p.sel.Matches(labels.Set(n.Labels)) {
		// The agent never runs there: not ours to hold.
		return c.setNode(ctx, n, false, false)
	}
	pod := p.pods[n.Name]
	if ready, _ := podReady(pod); ready {
		if hasTaint(n) {
			p.released = append(p.released, n.Name)
		}
		return c.setNode(ctx, n, false, true)
	}
	if n.Annotations[ReadyAnnotation] != "" {
		return nil // was ready once: never held again
	}
	h := held{node: n.Name, reason: heldReason(pod, n), since: n.CreationTimestamp.Time}
	if p.now.Sub(h.since) >= c.releaseAfter {
		return c.failOpen(ctx, p, n, h)
	}
	p.holding = append(p.holding, h)
	return c.setNode(ctx, n, true, false)
}

// failOpen releases node n held past the bound, whatever its agent says.
func (c *Controller) failOpen(ctx context.Context, p *pass, n *corev1.Node, h held) error {
	if !hasTaint(n) && n.Annotations[ReleasedAnnotation] == "" && n.CreationTimestamp.Before(ptr(p.owner.GetCreationTimestamp())) {
		// Joined before the resource existed: never held, so nothing
		// to release or report (installing on a running cluster must
		// not mark every node).
		return nil
	}
	first, err := c.release(ctx, n, h.reason)
	if err != nil {
		return err
	}
	if first {
		c.recorder.Eventf(p.owner, corev1.EventTypeWarning, "NodeReleasedUnready",
			"node %s released after %s without a ready agent (startup taint %s removed; the mirror may not serve it until its agent is ready): %s",
			n.Name, c.releaseAfter, TaintKey, h.reason)
	}
	p.unready = append(p.unready, h)
	return nil
}

// finish tells what the pass did (events, the NodesReady condition) and
// when to look again: when the next warning or release is due.
func (c *Controller) finish(ctx context.Context, p *pass) (reconcile.Result, error) {
	for _, n := range p.released {
		c.recorder.Eventf(p.owner, corev1.EventTypeNormal, "NodeReleased", "node %s: agent ready, startup taint %s removed", n, TaintKey)
	}
	next := c.report(p.owner, p.holding)
	if err := c.writeCondition(ctx, p.owner, p.holding, p.unready); err != nil {
		return reconcile.Result{}, err
	}
	if len(p.holding) == 0 {
		return reconcile.Result{}, nil
	}
	for _, h := range p.holding {
		next = min(next, max(c.releaseAfter-p.now.Sub(h.since), time.Second))
	}
	return reconcile.Result{RequeueAfter: min(next, c.resync)}, nil
}

// active returns the Spegel resource that manages the nodes and its agent
// DaemonSet, or nil when there is none yet (not deployed).
func (c *Controller) active(ctx context.Context) (*unstructured.Unstructured, *appsv1.DaemonSet, error) {
	owner, err := spegels.Oldest(ctx, c.client, c.gvk)
	if err != nil {
		return nil, nil, err
	}
	if owner == nil || owner.GetDeletionTimestamp() != nil {
		return nil, nil, nil
	}
	if !c.namespaces.Manages(owner.GetNamespace()) {
		return owner, nil, nil
	}
	var dss appsv1.DaemonSetList
	if err := c.client.List(ctx, &dss, client.InNamespace(owner.GetNamespace()), client.MatchingLabels{
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
	if err := c.client.List(ctx, &pods, client.InNamespace(ds.Namespace), client.MatchingLabels(ds.Spec.Selector.MatchLabels)); err != nil {
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
	err := c.client.Patch(ctx, n, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("updating node %s (startup taint %v): %w", n.Name, taint, err)
	}
	return nil
}

// release takes the taint off a node held past release-after and marks it
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
	err = c.client.Patch(ctx, n, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("releasing node %s held past %s: %w", n.Name, c.releaseAfter, err)
	}
	return first, nil
}

// report emits a warning for each node held longer than report-after, once
// per reason (a node first without an agent pod, then with an unready one,
// is told both ways), and returns when the next one is due.
func (c *Controller) report(owner *unstructured.Unstructured, holding []held) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	next := c.resync
	still := map[string]bool{}
	for _, h := range holding {
		still[h.node] = true
		waited := now.Sub(h.since)
		if waited < c.reportAfter {
			next = min(next, c.reportAfter-waited)
			continue
		}
		if c.reported[h.node] != h.reason {
			c.reported[h.node] = h.reason
			c.recorder.Eventf(owner, corev1.EventTypeWarning, "NodeHeld", "node %s kept its startup taint %s for %s: %s",
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
		parts = append(parts, fmt.Sprintf("%d node(s) keep the startup taint %s until their agent is ready (at most %s): %s", len(holding), TaintKey, c.releaseAfter, name(holding)))
	}
	if len(unready) > 0 {
		if reason != "NodesHeld" {
			reason = "NodesReleasedUnready"
		}
		parts = append(parts, fmt.Sprintf("%d node(s) released after %s without a ready agent (fail open: they run workloads, the mirror may not serve them): %s", len(unready), c.releaseAfter, name(unready)))
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
	err := c.client.Status().Patch(ctx, owner, patch)
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return fmt.Errorf("status of %s/%s changed meanwhile; retrying", owner.GetNamespace(), owner.GetName())
	}
	return err
}

func ptr[T any](v T) *T { return &v }
