package status

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/fleetmirror/fleetmirror/operator/chartlabels"
	"github.com/fleetmirror/fleetmirror/operator/hitratio"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
	"github.com/fleetmirror/fleetmirror/operator/spegels"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

// Released records the generation of each resource whose release last
// succeeded. The Helm reconciler's post hook writes it; the status
// controller turns it into status.observedGeneration and is woken up.
type Released struct {
	mu   sync.Mutex
	gens map[types.NamespacedName]int64
	ch   chan event.GenericEvent
}

// NewReleased returns an empty record.
func NewReleased() *Released {
	return &Released{gens: map[types.NamespacedName]int64{}, ch: make(chan event.GenericEvent, 64)}
}

// Mark records that obj's current generation was released.
func (r *Released) Mark(obj *unstructured.Unstructured) {
	r.mu.Lock()
	r.gens[client.ObjectKeyFromObject(obj)] = obj.GetGeneration()
	r.mu.Unlock()
	select {
	case r.ch <- event.GenericEvent{Object: obj.DeepCopy()}:
	default: // a periodic resync catches up
	}
}

// Generation returns the last released generation of key, or 0.
func (r *Released) Generation(key types.NamespacedName) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gens[key]
}

// Forget drops key once its resource is gone.
func (r *Released) Forget(key types.NamespacedName) {
	r.mu.Lock()
	delete(r.gens, key)
	r.mu.Unlock()
}

// Controller keeps the Ready condition, status.nodes and
// status.observedGeneration of every Spegel resource current. It writes
// with optimistic locking so it never overwrites the Helm reconciler's
// conditions; the Helm reconciler rewrites status with its own fields
// only, and the resulting update event brings this controller back.
type Controller struct {
	client   client.Client
	gvk      schema.GroupVersionKind
	released *Released
	// resync re-reads every resource this often.
	resync time.Duration
	// defaults are the provider override's values under every spec: they
	// decide, with the spec, whether the prep DaemonSet is wanted.
	defaults map[string]any
	// overrides are watches.yaml's overrideValues, set over every spec.
	overrides map[string]string
	// provider names the override in force, shown in the ProviderOverride
	// condition; empty: none.
	provider string
	// hitRatio, when set, puts the cluster's peer hit ratio over its window
	// in status.peerHits, scraped from the agent pods' metrics on
	// agentMetricsPort unless the values name another port.
	hitRatio         *hitratio.Sampler
	agentMetricsPort int
	// prober, when set, reads every agent's canary verdict (GET /canary
	// on the same port) into status.mirrorPath and, with nodeConditions
	// set, into each node's FleetmirrorMirrorPath condition.
	prober         *mirrorpath.Prober
	nodeConditions *mirrorpath.NodeWriter
	// agentPollPeriod is how often the agents are read for the hit ratio
	// and the canary verdicts, besides agent pod changes.
	agentPollPeriod time.Duration
	// namespaces the operator manages; a resource elsewhere is Ready
	// false, saying how to fix it.
	namespaces spegels.Namespaces
}

// DefaultAgentPollPeriod is how often the hit ratio is sampled and the
// agents' canary verdicts read (besides agent pod changes: readiness,
// IPs): a node condition lags its agent's verdict by at most this.
const DefaultAgentPollPeriod = time.Minute

// Option configures a Controller.
type Option func(*Controller)

// WithResync re-reads every resource this often (default 5m).
func WithResync(d time.Duration) Option { return func(c *Controller) { c.resync = d } }

// WithValues are the provider override's values under every spec
// (defaults) and watches.yaml's overrideValues over it.
func WithValues(defaults map[string]any, overrides map[string]string) Option {
	return func(c *Controller) { c.defaults, c.overrides = defaults, overrides }
}

// WithProvider names the provider override in force.
func WithProvider(name string) Option { return func(c *Controller) { c.provider = name } }

// WithHitRatio puts the cluster's peer hit ratio in status.peerHits.
func WithHitRatio(s *hitratio.Sampler) Option { return func(c *Controller) { c.hitRatio = s } }

// WithAgentMetricsPort is where agents serve metrics and /canary when a
// resource's values do not say (default 30122, the chart's).
func WithAgentMetricsPort(port int) Option { return func(c *Controller) { c.agentMetricsPort = port } }

// WithMirrorPath reads the agents' canary verdicts into
// status.mirrorPath and, when nodes is not nil, into node conditions.
func WithMirrorPath(p *mirrorpath.Prober, nodes *mirrorpath.NodeWriter) Option {
	return func(c *Controller) { c.prober, c.nodeConditions = p, nodes }
}

// WithAgentPollPeriod reads the agents this often besides agent pod
// changes (default DefaultAgentPollPeriod).
func WithAgentPollPeriod(d time.Duration) Option {
	return func(c *Controller) { c.agentPollPeriod = d }
}

// WithNamespaces limits the controller to the namespaces the operator
// manages (default: every namespace).
func WithNamespaces(ns spegels.Namespaces) Option { return func(c *Controller) { c.namespaces = ns } }

// New returns a controller for the Spegel resources of kind gvk; released
// is what the Helm reconciler's post hook marks.
func New(c client.Client, gvk schema.GroupVersionKind, released *Released, opts ...Option) (*Controller, error) {
	sc := &Controller{client: c, gvk: gvk, released: released}
	for _, o := range opts {
		o(sc)
	}
	if sc.resync == 0 {
		sc.resync = 5 * time.Minute
	}
	if sc.agentPollPeriod <= 0 {
		sc.agentPollPeriod = DefaultAgentPollPeriod
	}
	switch {
	case c == nil:
		return nil, errors.New("status: no client")
	case gvk.Kind == "":
		return nil, errors.New("status: no kind of resource to report on")
	case released == nil:
		return nil, errors.New("status: no record of released generations")
	case sc.resync < 0 || sc.agentMetricsPort < 0 || sc.agentMetricsPort > 65535:
		return nil, fmt.Errorf("status: resync %s must not be negative, agent metrics port %d must be 0 to 65535", sc.resync, sc.agentMetricsPort)
	case sc.nodeConditions != nil && sc.prober == nil:
		return nil, errors.New("status: node conditions need a canary prober")
	}
	return sc, nil
}

// SetupWithManager registers the controller.
func (c *Controller) SetupWithManager(mgr ctrl.Manager) error {
	cr := &unstructured.Unstructured{}
	cr.SetGroupVersionKind(c.gvk)
	toOwner := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
		l := o.GetLabels()
		if l[chartlabels.PartOf] != chartlabels.Fleetmirror || l[chartlabels.Instance] == "" {
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: l[chartlabels.Instance]}}}
	})
	b := ctrl.NewControllerManagedBy(mgr).
		Named("spegel-status").
		For(cr, builder.WithPredicates(predicate.Funcs{})).
		Watches(&appsv1.DaemonSet{}, toOwner).
		WatchesRawSource(source.Channel(c.released.ch, &handler.EnqueueRequestForObject{}))
	if c.hitRatio != nil || c.prober != nil {
		// Agent pods coming and going (or turning ready) change who is
		// scraped and what their canary says.
		b = b.Watches(&corev1.Pod{}, toOwner)
	}
	return b.Complete(c)
}

// Reconcile implements reconcile.Reconciler.
func (c *Controller) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	obj := &unstructured.Unstructured{}
	obj.SetGroupVersionKind(c.gvk)
	if err := c.client.Get(ctx, req.NamespacedName, obj); err != nil {
		if apierrors.IsNotFound(err) {
			c.released.Forget(req.NamespacedName)
			return reconcile.Result{}, c.removeNodeConditions(ctx)
		}
		return reconcile.Result{}, err
	}
	if obj.GetDeletionTimestamp() != nil {
		return reconcile.Result{}, c.removeNodeConditions(ctx)
	}
	if err := c.namespaces.Refusal(obj); err != nil {
		// Nothing of it is cached or readable there; only say why.
		return reconcile.Result{}, c.writeCondition(ctx, obj, "Ready", false, ReasonNamespaceNotManaged, err.Error())
	}
	rd, eff, err := c.rollout(ctx, req, obj)
	if err != nil {
		return reconcile.Result{}, err
	}
	orig := obj.DeepCopy()
	resync, err := c.setStatus(ctx, req, obj, rd, eff)
	if err != nil {
		return reconcile.Result{}, err
	}
	patch := client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{})
	if data, err := patch.Data(obj); err == nil && string(data) == "{}" {
		return reconcile.Result{RequeueAfter: resync}, nil
	}
	if err := c.client.Status().Patch(ctx, obj, patch); err != nil {
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			return reconcile.Result{Requeue: true}, nil
		}
		return reconcile.Result{}, fmt.Errorf("updating status of %s: %w", req, err)
	}
	return reconcile.Result{RequeueAfter: resync}, nil
}

// rollout evaluates the release's DaemonSets against the components its
// values want; eff are those values (defaults, spec, overrides).
func (c *Controller) rollout(ctx context.Context, req reconcile.Request, obj *unstructured.Unstructured) (Rollout, map[string]any, error) {
	var list appsv1.DaemonSetList
	if err := c.client.List(ctx, &list, client.InNamespace(req.Namespace), client.MatchingLabels{
		chartlabels.PartOf: chartlabels.Fleetmirror, chartlabels.Instance: req.Name,
	}); err != nil {
		return Rollout{}, nil, fmt.Errorf("listing DaemonSets of %s: %w", req, err)
	}
	want := []string{ComponentAgent}
	spec, _, _ := unstructured.NestedMap(obj.Object, "spec")
	eff, err := values.Effective(c.defaults, spec, c.overrides)
	if err != nil {
		// The release cannot render either; its conditions say why.
		eff = values.Merge(c.defaults, spec)
	}
	if on, _, _ := unstructured.NestedBool(eff, "containerdPrep", "enabled"); on {
		want = append(want, ComponentPrep)
	}
	rd := Evaluate(list.Items, want)
	conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	if !conditionTrue(conds, "Deployed") {
		rd.Ready, rd.Reason, rd.Message = false, "NotDeployed", "the release is not deployed; see the Deployed and ReleaseFailed conditions"
	}
	return rd, eff, nil
}

// setStatus writes obj's status (conditions, nodes, what the agents say,
// the released generation) and returns how soon to look again.
func (c *Controller) setStatus(ctx context.Context, req reconcile.Request, obj *unstructured.Unstructured, rd Rollout, eff map[string]any) (time.Duration, error) {
	st, _, _ := unstructured.NestedMap(obj.Object, "status")
	if st == nil {
		st = map[string]any{}
	}
	conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	conds = setCondition(conds, "Ready", rd.Ready, rd.Reason, rd.Message)
	if c.provider != "" {
		conds = setCondition(conds, "ProviderOverride", true, "Applied", fmt.Sprintf(
			"provider override %q is in force: its values lie under this spec (chart defaults < provider override < spec < images map)", c.provider))
	} else {
		conds = setCondition(conds, "ProviderOverride", false, "None", "no provider override: the chart's defaults lie under this spec")
	}
	st["conditions"] = conds
	st["nodes"] = map[string]any{"desired": rd.Nodes.Desired, "updated": rd.Nodes.Updated, "ready": rd.Nodes.Ready}
	resync := c.resync
	if c.hitRatio != nil || c.prober != nil {
		resync = min(resync, c.agentPollPeriod)
		if err := c.agentStatus(ctx, req, eff, st, int(rd.Nodes.Desired)); err != nil {
			return 0, err
		}
	}
	if g := c.released.Generation(req.NamespacedName); g > 0 {
		st["observedGeneration"] = g
	}
	obj.Object["status"] = st
	return resync, nil
}

// agentStatus puts what the agents say into st: the peer hit ratio and
// the canary verdicts.
func (c *Controller) agentStatus(ctx context.Context, req reconcile.Request, eff, st map[string]any, desired int) error {
	agents, err := c.agents(ctx, req, eff)
	if err != nil {
		return err
	}
	if c.hitRatio != nil {
		if hits, err := c.peerHits(ctx, agents); err == nil {
			st["peerHits"] = hits
		} else {
			log.FromContext(ctx).V(1).Info("peer hit ratio unavailable", "err", err.Error())
		}
	}
	if c.prober != nil {
		st["mirrorPath"] = c.mirrorPath(ctx, agents, desired)
	}
	return nil
}

// ReasonNamespaceNotManaged: the resource is in a namespace the operator
// has no rights in.
const ReasonNamespaceNotManaged = "NamespaceNotManaged"

// writeCondition sets one condition on obj's status, keeping the rest.
func (c *Controller) writeCondition(ctx context.Context, obj *unstructured.Unstructured, typ string, ok bool, reason, msg string) error {
	orig := obj.DeepCopy()
	conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	conds = setCondition(conds, typ, ok, reason, msg)
	if err := unstructured.SetNestedSlice(obj.Object, conds, "status", "conditions"); err != nil {
		return err
	}
	patch := client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{})
	if data, err := patch.Data(obj); err == nil && string(data) == "{}" {
		return nil
	}
	if err := c.client.Status().Patch(ctx, obj, patch); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
		return fmt.Errorf("updating status of %s/%s: %w", obj.GetNamespace(), obj.GetName(), err)
	}
	return nil
}

// agent is one agent pod reachable at base (http://IP:metrics port).
type agent struct {
	node, base string
}

// agents lists the resource's agent pods that have an IP, with the metrics
// port the values name (else WithAgentMetricsPort, else 30122).
func (c *Controller) agents(ctx context.Context, req reconcile.Request, vals map[string]any) ([]agent, error) {
	var pods corev1.PodList
	if err := c.client.List(ctx, &pods, client.InNamespace(req.Namespace), client.MatchingLabels{
		chartlabels.Instance: req.Name, chartlabels.Component: ComponentAgent,
	}); err != nil {
		return nil, fmt.Errorf("listing agent pods: %w", err)
	}
	port := c.agentMetricsPort
	if p, ok, _ := unstructured.NestedFieldNoCopy(vals, "ports", "metrics"); ok {
		switch n := p.(type) {
		case int64:
			port = int(n)
		case int:
			port = n
		case float64:
			port = int(n)
		}
	}
	if port == 0 {
		port = 30122
	}
	var out []agent
	for _, p := range pods.Items {
		if p.Status.PodIP != "" && p.DeletionTimestamp == nil {
			out = append(out, agent{node: p.Spec.NodeName, base: "http://" + net.JoinHostPort(p.Status.PodIP, strconv.Itoa(port))})
		}
	}
	return out, nil
}

// peerHits scrapes the resource's agent pods and tells the cluster's peer
// hit ratio: of the requests containerd sent its agent and a peer or the
// upstream answered, the share peers answered.
func (c *Controller) peerHits(ctx context.Context, agents []agent) (map[string]any, error) {
	var urls []string
	for _, a := range agents {
		urls = append(urls, a.base+"/metrics")
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	r, err := c.hitRatio.Observe(sctx, urls)
	if err != nil {
		return nil, err
	}
	hits := map[string]any{
		"requests": int64(r.Requests),
		"window":   r.Window.Round(time.Second).String(),
		"agents":   fmt.Sprintf("%d/%d", r.Reached, r.Total),
	}
	if r.Requests > 0 {
		hits["ratio"] = strconv.FormatFloat(r.Value, 'f', 2, 64)
	}
	return hits, nil
}

// removeNodeConditions takes the mirror path condition off the nodes once
// the resource is going (one resource serves every node); an error
// requeues, so a node missed now is tried again.
func (c *Controller) removeNodeConditions(ctx context.Context) error {
	if c.nodeConditions == nil {
		return nil
	}
	return c.nodeConditions.RemoveAll(ctx)
}

// mirrorPath reads every agent's canary verdict, writes each node's
// condition (when NodeConditions is set) and returns status.mirrorPath.
// A node whose condition cannot be written is logged and tried again at
// the next pass: one node must not keep the resource's status stale.
func (c *Controller) mirrorPath(ctx context.Context, agents []agent, desired int) map[string]any {
	as := make([]mirrorpath.Agent, 0, len(agents))
	for _, a := range agents {
		if a.node != "" {
			as = append(as, mirrorpath.Agent{Node: a.node, URL: a.base + "/canary"})
		}
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rs := c.prober.Probe(sctx, as)
	if c.nodeConditions != nil {
		for _, r := range rs {
			if err := c.nodeConditions.Set(ctx, r.Node, mirrorpath.NodeCondition(r)); err != nil {
				log.FromContext(ctx).Info("node condition not written", "node", r.Node, "err", err.Error())
			}
		}
	}
	sum := mirrorpath.Summarize(rs)
	// A node whose agent has no IP yet is not proven either.
	sum.Total = max(sum.Total, desired)
	return sum.Status()
}

func conditionTrue(conds []any, typ string) bool {
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			return m["status"] == "True"
		}
	}
	return false
}

// setCondition returns conds with typ set, keeping lastTransitionTime when
// the status did not change. The shape matches the Helm reconciler's
// conditions, which it reads back and keeps.
func setCondition(conds []any, typ string, ok bool, reason, msg string) []any {
	s := "False"
	if ok {
		s = "True"
	}
	out := make([]any, 0, len(conds)+1)
	var found bool
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] != typ {
			out = append(out, c)
			continue
		}
		found = true
		n := map[string]any{"type": typ, "status": s, "reason": reason, "message": msg, "lastTransitionTime": m["lastTransitionTime"]}
		if m["status"] != s || m["lastTransitionTime"] == nil {
			n["lastTransitionTime"] = metav1.Now().UTC().Format(time.RFC3339)
		}
		out = append(out, n)
	}
	if !found {
		out = append(out, map[string]any{"type": typ, "status": s, "reason": reason, "message": msg,
			"lastTransitionTime": metav1.Now().UTC().Format(time.RFC3339)})
	}
	return out
}

// SetCondition is setCondition for the operator's other controllers.
func SetCondition(conds []any, typ string, ok bool, reason, msg string) []any {
	return setCondition(conds, typ, ok, reason, msg)
}
