// Package manager wires the operator: a controller-runtime manager with a
// helm-operator-plugins reconciler per entry of watches.yaml (the Spegel
// kind and helm-charts/spegel) and the status controller beside it.
package manager

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	"helm.sh/helm/v3/pkg/chartutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/yaml"

	helmclient "github.com/operator-framework/helm-operator-plugins/pkg/client"
	"github.com/operator-framework/helm-operator-plugins/pkg/hook"
	"github.com/operator-framework/helm-operator-plugins/pkg/reconciler"
	helmvalues "github.com/operator-framework/helm-operator-plugins/pkg/values"
	"github.com/operator-framework/helm-operator-plugins/pkg/watches"

	helmrelease "helm.sh/helm/v3/pkg/release"

	"github.com/fleetmirror/fleetmirror/operator/helmaction"
	"github.com/fleetmirror/fleetmirror/operator/hitratio"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
	"github.com/fleetmirror/fleetmirror/operator/networkkey"
	"github.com/fleetmirror/fleetmirror/operator/readiness"
	"github.com/fleetmirror/fleetmirror/operator/spegels"
	"github.com/fleetmirror/fleetmirror/operator/status"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

// PauseAnnotation set to "true" on a resource stops its reconciliation;
// status shows a Paused condition.
const PauseAnnotation = "fleetmirror.dev/pause-reconcile"

// LeaderElectionID names the leader lease, in the operator's namespace
// unless Options.LeaderElectionNamespace says otherwise.
const LeaderElectionID = "operator.fleetmirror.dev"

// Options configure New. WatchesFile and Inputs are required.
type Options struct {
	// WatchesFile is watches.yaml; relative chart paths in it are read
	// from its folder.
	WatchesFile string
	// Inputs are the images map and imageMirror given to every release.
	Inputs values.Inputs
	// Timeouts bound Helm's waits on hooks.
	Timeouts helmaction.Timeouts
	// LeaderElection on (the default in cmd/operator) lets several
	// replicas run with one active.
	LeaderElection          bool
	LeaderElectionNamespace string
	// MetricsAddr and ProbeAddr: "0" turns them off.
	MetricsAddr, ProbeAddr string
	// ReconcilePeriod re-renders every release this often even without
	// events, putting back what was changed by hand. 0: only on events.
	ReconcilePeriod time.Duration
	// Provider names the provider override in force (its values are
	// Inputs.Defaults); shown in each resource's ProviderOverride condition.
	Provider string
	// NodeReadiness runs the startup-taint controller (package readiness);
	// ReportAfter is how long a node may be held before a warning event.
	NodeReadiness bool
	ReportAfter   time.Duration
	// HitRatioWindow is the window of the cluster peer hit ratio in each
	// resource's status, scraped from the agents' metrics; 0 turns it off.
	// AgentMetricsPort is where agents serve them when a resource's values
	// do not say (the chart's default, 30122).
	HitRatioWindow   time.Duration
	AgentMetricsPort int
	// MirrorPath reads each agent's canary verdict (GET /canary on the
	// metrics port) into status.mirrorPath; NodeConditions also puts it
	// on each node as the FleetmirrorMirrorPath condition (needs patch on
	// nodes/status).
	MirrorPath, NodeConditions bool
	// MirrorPathPeriod is how often the agents' verdicts (and the hit
	// ratio) are read besides agent pod changes; 0: a minute.
	MirrorPathPeriod time.Duration
	// ReleaseAfter is how long node readiness holds a node at most: past
	// it the startup taint comes off whatever the agent says (fail open).
	ReleaseAfter time.Duration
	// ManagedNamespaces are the only namespaces the operator watches and
	// acts in (where the operator chart gave it Roles); Spegel resources,
	// watched everywhere, are refused elsewhere with a condition naming
	// the fix. Empty: every namespace.
	ManagedNamespaces []string
	// SkipNameValidation lets one process start several managers (tests).
	SkipNameValidation bool
	Log                *slog.Logger
}

// New returns a manager, not yet started, with every controller added.
func New(cfg *rest.Config, o Options) (ctrl.Manager, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	log := logr.FromSlogHandler(o.Log.Handler())
	ctrl.SetLogger(log)
	if o.NodeReadiness {
		o.Inputs.Defaults = withTaintFallback(o.Inputs.Defaults, o.ReleaseAfter)
	}
	ws, err := loadWatches(o.WatchesFile)
	if err != nil {
		return nil, err
	}
	managed := spegels.Namespaces(o.ManagedNamespaces)
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Logger:                  log,
		Metrics:                 metricsserver.Options{BindAddress: o.MetricsAddr},
		HealthProbeBindAddress:  o.ProbeAddr,
		LeaderElection:          o.LeaderElection,
		LeaderElectionID:        LeaderElectionID,
		LeaderElectionNamespace: o.LeaderElectionNamespace,
		// Give up a lost lease at once rather than keep acting on it.
		LeaderElectionReleaseOnCancel: true,
		Controller:                    config.Controller{SkipNameValidation: &o.SkipNameValidation},
		Cache:                         cacheOptions(ws, managed),
	})
	if err != nil {
		return nil, fmt.Errorf("creating manager: %w", err)
	}
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("ping", healthz.Ping); err != nil {
		return nil, err
	}
	acg, err := actionClientGetter(mgr, o.Timeouts)
	if err != nil {
		return nil, err
	}
	for _, w := range ws {
		if err := addControllers(mgr, o, w, acg, managed, log); err != nil {
			return nil, err
		}
	}
	return mgr, nil
}

// validate checks the required options and the bounds New relies on.
func (o Options) validate() error {
	if o.WatchesFile == "" {
		return errors.New("manager: no watches file; set --watches-file")
	}
	if err := o.Inputs.Validate(); err != nil {
		return err
	}
	if o.Timeouts.Uninstall <= 0 || o.Timeouts.Install <= 0 || o.Timeouts.Upgrade <= 0 {
		return errors.New("manager: install, upgrade and uninstall timeouts must be more than 0")
	}
	if o.NodeReadiness && o.ReportAfter <= 0 {
		return errors.New("manager: node readiness needs a report-after duration more than 0")
	}
	if o.NodeReadiness && o.ReleaseAfter <= 0 {
		return errors.New("manager: node readiness needs a release-after duration more than 0 (a node is never held for good)")
	}
	return nil
}

// withTaintFallback returns defaults with the agents' fallback for when
// the operator is down: each removes the taint from its own node a minute
// past the bound, after the operator would have (with its event and
// status). Laid under every spec like the provider override's values.
func withTaintFallback(defaults map[string]any, releaseAfter time.Duration) map[string]any {
	d := make(map[string]any, len(defaults)+1)
	for k, v := range defaults {
		d[k] = v
	}
	if _, set := d["releaseTaintAfter"]; !set {
		d["releaseTaintAfter"] = (releaseAfter + time.Minute).String()
	}
	return d
}

// addControllers adds, for watch w, the Helm reconciler, the status
// controller and (when on) node readiness.
func addControllers(mgr ctrl.Manager, o Options, w watches.Watch, acg helmclient.ActionClientGetter, managed spegels.Namespaces, log logr.Logger) error {
	released := status.NewReleased()
	gvk := w.GroupVersionKind
	getter, err := helmaction.NewGetter(acg, mgr.GetEventRecorderFor("spegel-operator"), helmaction.WithNamespaces(managed))
	if err != nil {
		return err
	}
	r, err := reconciler.New(reconcilerOptions(mgr, o, w, getter, managed, released, log)...)
	if err != nil {
		return fmt.Errorf("reconciler for %s: %w", gvk, err)
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up reconciler for %s: %w", gvk, err)
	}
	sc, err := status.New(mgr.GetClient(), gvk, released, statusOptions(mgr, o, w, managed)...)
	if err != nil {
		return err
	}
	if err := sc.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up status controller for %s: %w", gvk, err)
	}
	if !o.NodeReadiness {
		return nil
	}
	rc, err := readiness.New(mgr.GetClient(), gvk, mgr.GetEventRecorderFor("spegel-node-readiness"),
		readiness.WithReportAfter(o.ReportAfter), readiness.WithReleaseAfter(o.ReleaseAfter), readiness.WithNamespaces(managed))
	if err != nil {
		return err
	}
	if err := rc.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up node readiness for %s: %w", gvk, err)
	}
	return nil
}

// reconcilerOptions are the Helm reconciler's options for watch w; its
// post hook marks each released generation for the status controller.
func reconcilerOptions(mgr ctrl.Manager, o Options, w watches.Watch, getter helmaction.Getter, managed spegels.Namespaces, released *status.Released, log logr.Logger) []reconciler.Option {
	gvk := w.GroupVersionKind
	in := o.Inputs
	in.Overrides = w.OverrideValues
	opts := []reconciler.Option{
		reconciler.WithChart(*w.Chart),
		reconciler.WithGroupVersionKind(gvk),
		reconciler.WithActionClientGetter(getter),
		reconciler.WithValueTranslator(translator(mgr.GetClient(), gvk, in, managed)),
		reconciler.WithPauseReconcileHandler(reconciler.PauseReconcileIfAnnotationTrue(PauseAnnotation)),
		reconciler.WithPostHook(hook.PostHookFunc(func(obj *unstructured.Unstructured, _ helmrelease.Release, _ logr.Logger) error {
			released.Mark(obj)
			return nil
		})),
		reconciler.WithReconcilePeriod(reconcilePeriod(w, o.ReconcilePeriod)),
		reconciler.WithMaxReleaseHistory(10),
		reconciler.WithLog(log.WithName("helm").WithValues("kind", gvk.Kind)),
	}
	if w.WatchDependentResources != nil && !*w.WatchDependentResources {
		opts = append(opts, reconciler.SkipDependentWatches(true))
	}
	if w.MaxConcurrentReconciles != nil {
		opts = append(opts, reconciler.WithMaxConcurrentReconciles(*w.MaxConcurrentReconciles))
	}
	return opts
}

// statusOptions are the status controller's options for watch w.
func statusOptions(mgr ctrl.Manager, o Options, w watches.Watch, managed spegels.Namespaces) []status.Option {
	opts := []status.Option{status.WithValues(o.Inputs.Defaults, w.OverrideValues), status.WithProvider(o.Provider),
		status.WithAgentMetricsPort(o.AgentMetricsPort), status.WithNamespaces(managed), status.WithAgentPollPeriod(o.MirrorPathPeriod)}
	if o.HitRatioWindow > 0 {
		opts = append(opts, status.WithHitRatio(hitratio.New(o.HitRatioWindow, nil)))
	}
	if o.MirrorPath || o.NodeConditions {
		var nodes *mirrorpath.NodeWriter
		if o.NodeConditions {
			nodes = mirrorpath.NewNodeWriter(mgr.GetClient())
		}
		opts = append(opts, status.WithMirrorPath(mirrorpath.NewProber(nil), nodes))
	}
	return opts
}

// cacheOptions restricts the cache to what the operator's RBAC allows:
// namespaced kinds only in the managed namespaces (so it needs no
// cluster-wide list or watch on Secrets, DaemonSets or pods), the watched
// kinds everywhere (a resource in another namespace must still be seen, to
// be refused with a condition), cluster-scoped kinds (nodes) as they are.
func cacheOptions(ws []watches.Watch, managed spegels.Namespaces) cache.Options {
	// Node readiness reads agent pods only: never cache every pod.
	o := cache.Options{ByObject: map[client.Object]cache.ByObject{&corev1.Pod{}: {Label: readiness.AgentPods}}}
	if len(managed) == 0 {
		return o
	}
	o.DefaultNamespaces = map[string]cache.Config{}
	for _, ns := range managed {
		o.DefaultNamespaces[ns] = cache.Config{}
	}
	for _, w := range ws {
		cr := &unstructured.Unstructured{}
		cr.SetGroupVersionKind(w.GroupVersionKind)
		// An empty, non-nil map: every namespace.
		o.ByObject[cr] = cache.ByObject{Namespaces: map[string]cache.Config{}}
	}
	return o
}

func actionClientGetter(mgr ctrl.Manager, t helmaction.Timeouts) (helmclient.ActionClientGetter, error) {
	cg, err := helmclient.NewActionConfigGetter(mgr.GetConfig(), mgr.GetRESTMapper())
	if err != nil {
		return nil, fmt.Errorf("helm action config: %w", err)
	}
	return helmclient.NewActionClientGetter(cg, t.Options()...)
}

// translator checks that obj is in a managed namespace and the one
// resource of its kind allowed to act, makes sure its network key Secret
// exists (the one step before the release: the reconciler runs it before
// every install and dry-run upgrade), and turns its spec into chart values.
func translator(c client.Client, gvk schema.GroupVersionKind, in values.Inputs, managed spegels.Namespaces) helmvalues.Translator {
	return helmvalues.TranslatorFunc(func(ctx context.Context, obj *unstructured.Unstructured) (chartutil.Values, error) {
		if err := managed.Refusal(obj); err != nil {
			return nil, err
		}
		if err := onlyOne(ctx, c, gvk, obj); err != nil {
			return nil, err
		}
		spec, _, _ := unstructured.NestedMap(obj.Object, "spec")
		own := networkkey.SecretName(obj.GetName())
		vals, err := values.Translate(spec, own, in)
		if err != nil {
			return nil, err
		}
		name := values.KeySecret(vals)
		if err := networkkey.Ensure(ctx, c, obj, name, name == own); err != nil {
			return nil, err
		}
		return vals, nil
	})
}

// onlyOne allows one resource per cluster: every release runs an agent on
// every node with the same host ports and writes the same hosts.toml
// files, so two would fight over each node. The oldest resource wins; a
// later one, in any namespace, is refused until the first is deleted.
func onlyOne(ctx context.Context, c client.Client, gvk schema.GroupVersionKind, obj *unstructured.Unstructured) error {
	first, err := spegels.Oldest(ctx, c, gvk)
	if err != nil {
		return err
	}
	if first == nil || first.GetUID() == obj.GetUID() {
		return nil
	}
	return fmt.Errorf("only one %s is allowed per cluster (each runs an agent on every node with the same host ports and hosts.toml files): %s/%s already manages the nodes; delete %s/%s, or delete %s/%s first",
		gvk.Kind, first.GetNamespace(), first.GetName(), obj.GetNamespace(), obj.GetName(), first.GetNamespace(), first.GetName())
}

// reconcilePeriod is the entry's reconcilePeriod when it has one (it names
// its kind, so it is the more specific), else the operator's flag.
func reconcilePeriod(w watches.Watch, flag time.Duration) time.Duration {
	if w.ReconcilePeriod != nil {
		return w.ReconcilePeriod.Duration
	}
	return flag
}

// watchFields are the fields of a watches.yaml entry this operator
// honours: the library's, but selector (see loadWatches).
var watchFields = map[string]bool{
	"group": true, "version": true, "kind": true, "chart": true, "watchDependentResources": true,
	"overrideValues": true, "reconcilePeriod": true, "maxConcurrentReconciles": true,
}

// loadWatches reads watches.yaml, resolving chart paths against its folder.
// A field it would not honour refuses the file, by name, rather than
// being parsed and ignored.
func loadWatches(path string) ([]watches.Watch, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("watches file: %w", err)
	}
	var raw []map[string]any
	if err := yaml.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("watches file %s: %w", path, err)
	}
	if len(raw) == 0 {
		return nil, fmt.Errorf("watches file %s: no entries; want at least one group/version/kind and chart", path)
	}
	for i, w := range raw {
		for k := range w {
			switch {
			case k == "selector":
				// One resource manages every node and the oldest wins
				// (onlyOne); the status and node readiness controllers
				// watch every resource of the kind. A selector would make
				// the release follow only some of them while the others
				// still block and report: refuse rather than half-honour.
				return nil, fmt.Errorf("watches file %s: entry %d: selector is not supported: one resource of the kind manages every node of the cluster, so the operator reconciles all of them; remove it", path, i+1)
			case !watchFields[k]:
				return nil, fmt.Errorf("watches file %s: entry %d: unknown field %q; known: group, version, kind, chart, watchDependentResources, overrideValues, reconcilePeriod, maxConcurrentReconciles", path, i+1, k)
			}
		}
		if p, ok := w["chart"].(string); ok && !filepath.IsAbs(p) {
			w["chart"] = filepath.Join(filepath.Dir(path), p)
		}
	}
	b, err = yaml.Marshal(raw)
	if err != nil {
		return nil, err
	}
	ws, err := watches.LoadReader(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("watches file %s: %w", path, err)
	}
	for _, w := range ws {
		// Checked here so that a bad value stops the start, naming it,
		// instead of failing every reconcile.
		if w.MaxConcurrentReconciles != nil && *w.MaxConcurrentReconciles < 1 {
			return nil, fmt.Errorf("watches file %s: %s: maxConcurrentReconciles is %d; want 1 or more", path, w.Kind, *w.MaxConcurrentReconciles)
		}
		if w.ReconcilePeriod != nil && w.ReconcilePeriod.Duration < 0 {
			return nil, fmt.Errorf("watches file %s: %s: reconcilePeriod %s is negative; want 0 (only on events) or more", path, w.Kind, w.ReconcilePeriod.Duration)
		}
		if _, err := values.Effective(nil, nil, w.OverrideValues); err != nil {
			return nil, fmt.Errorf("watches file %s: %s: %w", path, w.Kind, err)
		}
	}
	return ws, nil
}
