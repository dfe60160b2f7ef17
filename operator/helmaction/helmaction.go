// Package helmaction wraps the Helm action client the reconciler uses: events
// for install, upgrade and uninstall, time limits on every action,
// recovery of a release left pending by an operator that died mid-way, and
// hands off releases the operator did not install.
package helmaction

import (
	"context"
	"errors"
	"fmt"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/storage/driver"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"

	helmclient "github.com/operator-framework/helm-operator-plugins/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/spegels"
)

// Timeouts bound Helm's waits on hooks, so a hook that never finishes (a
// node whose cleanup pod cannot start) fails the action instead of holding
// the worker.
type Timeouts struct {
	Install, Upgrade, Uninstall time.Duration
}

// Options returns the action client getter options that apply t.
func (t Timeouts) Options() []helmclient.ActionClientGetterOption {
	return []helmclient.ActionClientGetterOption{
		helmclient.AppendInstallOptions(func(i *action.Install) error { i.Timeout = t.Install; return nil }),
		helmclient.AppendUpgradeOptions(func(u *action.Upgrade) error { u.Timeout = t.Upgrade; return nil }),
		helmclient.AppendUninstallOptions(func(u *action.Uninstall) error { u.Timeout = t.Uninstall; return nil }),
		helmclient.AppendInstallFailureUninstallOptions(func(u *action.Uninstall) error { u.Timeout = t.Uninstall; return nil }),
	}
}

// Getter wraps an ActionClientGetter.
type Getter struct {
	next     helmclient.ActionClientGetter
	recorder record.EventRecorder
	// namespaces the operator may act in; a resource elsewhere gets a
	// client that touches nothing (see unmanaged).
	namespaces spegels.Namespaces
}

// Option configures a Getter.
type Option func(*Getter)

// WithNamespaces limits the Getter to the namespaces the operator manages
// (default: every namespace).
func WithNamespaces(ns spegels.Namespaces) Option { return func(g *Getter) { g.namespaces = ns } }

// NewGetter wraps next; install, upgrade and uninstall events go to
// recorder.
func NewGetter(next helmclient.ActionClientGetter, recorder record.EventRecorder, opts ...Option) (Getter, error) {
	g := Getter{next: next, recorder: recorder}
	for _, o := range opts {
		o(&g)
	}
	if next == nil || recorder == nil {
		return Getter{}, errors.New("helmaction: an action client getter and an event recorder are required")
	}
	return g, nil
}

// ActionClientFor implements helmclient.ActionClientGetter. Before handing
// out the client it marks a pending release of obj as failed: the workqueue
// never runs two reconciles of one resource at once and leader election
// keeps other operators out, so a pending release at this point belongs to
// an operator that is gone, and Helm would refuse every later action.
func (g Getter) ActionClientFor(ctx context.Context, obj client.Object) (helmclient.ActionInterface, error) {
	if err := g.namespaces.Refusal(obj); err != nil {
		return unmanaged{err}, nil
	}
	ac, err := g.next.ActionClientFor(ctx, obj)
	if err != nil {
		return nil, err
	}
	// Someone else's release of the same name (Spegel's own chart installs
	// spegel/spegel too) is left exactly as it is: never upgraded, never
	// marked failed, never uninstalled when the resource goes.
	if err := owned(ac.Config(), obj); err != nil {
		return unmanaged{err}, nil
	}
	if err := RecoverPending(ac.Config(), obj.GetName()); err != nil {
		return nil, err
	}
	return actionClient{ActionInterface: ac, obj: obj, rec: g.recorder}, nil
}

// OwnerLabel marks a release (on its Helm storage records) as the one the
// operator installed for the Spegel resource named in its value.
const OwnerLabel = "fleetmirror.dev/spegel"

// ErrForeign is the error of every action on a release the operator did
// not install.
var ErrForeign = errors.New("a Helm release of this name exists that this operator did not install")

// owned returns nil when obj's release is absent or carries OwnerLabel for
// obj, and otherwise an error that names the release and how to resolve it.
func owned(cfg *action.Configuration, obj client.Object) error {
	last, err := cfg.Releases.Last(obj.GetName())
	if errors.Is(err, driver.ErrReleaseNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading release %s: %w", obj.GetName(), err)
	}
	if last.Labels[OwnerLabel] == obj.GetName() {
		return nil
	}
	chartName := "?"
	if last.Chart != nil && last.Chart.Metadata != nil {
		chartName = last.Chart.Metadata.Name + "-" + last.Chart.Metadata.Version
	}
	return fmt.Errorf("%w: release %s in namespace %s (chart %s, revision %d, %s) has no %s=%s label, so it is left alone; "+
		"uninstall it first (helm uninstall %s -n %s; see the migration guide in the operator chart's README) or give this resource another name",
		ErrForeign, last.Name, last.Namespace, chartName, last.Version, last.Info.Status, OwnerLabel, obj.GetName(), last.Name, last.Namespace)
}

// RecoverPending marks the last revision of release name failed if it is
// pending, so the next upgrade can replace it.
func RecoverPending(cfg *action.Configuration, name string) error {
	last, err := cfg.Releases.Last(name)
	if errors.Is(err, driver.ErrReleaseNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading release %s: %w", name, err)
	}
	if !last.Info.Status.IsPending() {
		return nil
	}
	was := last.Info.Status
	last.SetStatus(release.StatusFailed, fmt.Sprintf("marked failed by the operator: left %s by an interrupted operation", was))
	if err := cfg.Releases.Update(last); err != nil {
		return fmt.Errorf("marking release %s revision %d (%s) failed: %w", name, last.Version, was, err)
	}
	cfg.Log("release %s revision %d was %s; marked failed so it can be upgraded", name, last.Version, was)
	return nil
}

// unmanaged is the client for a resource in a namespace the operator has
// no rights in. The operator cannot have installed anything there, so
// there is no release to read or uninstall (deleting the resource just
// drops the finalizer); installing is refused with the reason, which the
// value translator reports first as the Irreconcilable condition.
type unmanaged struct{ err error }

func (unmanaged) Get(string, ...helmclient.GetOption) (*release.Release, error) {
	return nil, driver.ErrReleaseNotFound
}

func (unmanaged) History(string, ...helmclient.HistoryOption) ([]*release.Release, error) {
	return nil, driver.ErrReleaseNotFound
}

func (u unmanaged) Install(string, string, *chart.Chart, map[string]any, ...helmclient.InstallOption) (*release.Release, error) {
	return nil, u.err
}

func (u unmanaged) Upgrade(string, string, *chart.Chart, map[string]any, ...helmclient.UpgradeOption) (*release.Release, error) {
	return nil, u.err
}

func (unmanaged) Uninstall(string, ...helmclient.UninstallOption) (*release.UninstallReleaseResponse, error) {
	return nil, driver.ErrReleaseNotFound
}

func (u unmanaged) Reconcile(*release.Release) error { return u.err }

func (unmanaged) Config() *action.Configuration { return &action.Configuration{} }

type actionClient struct {
	helmclient.ActionInterface
	obj client.Object
	rec record.EventRecorder
}

func (c actionClient) Install(name, ns string, chrt *chart.Chart, vals map[string]any, opts ...helmclient.InstallOption) (*release.Release, error) {
	opts = append(opts, func(i *action.Install) error { i.Labels = ownerLabels(i.Labels, name); return nil })
	rel, err := c.ActionInterface.Install(name, ns, chrt, vals, opts...)
	if err != nil {
		c.rec.Eventf(c.obj, corev1.EventTypeWarning, "InstallFailed", "installing release %s: %v", name, err)
		return rel, err
	}
	c.rec.Eventf(c.obj, corev1.EventTypeNormal, "Installed", "release %s revision %d installed", name, rel.Version)
	return rel, nil
}

func (c actionClient) Upgrade(name, ns string, chrt *chart.Chart, vals map[string]any, opts ...helmclient.UpgradeOption) (*release.Release, error) {
	// The reconciler also calls Upgrade as a server-side dry run to see
	// whether anything changed: no event for that one.
	probe := &action.Upgrade{}
	for _, o := range opts {
		_ = o(probe)
	}
	dry := probe.DryRun
	opts = append(opts, func(u *action.Upgrade) error { u.Labels = ownerLabels(u.Labels, name); return nil })
	rel, err := c.ActionInterface.Upgrade(name, ns, chrt, vals, opts...)
	switch {
	case err != nil && dry:
		c.rec.Eventf(c.obj, corev1.EventTypeWarning, "RenderFailed", "rendering release %s: %v", name, err)
	case err != nil:
		c.rec.Eventf(c.obj, corev1.EventTypeWarning, "UpgradeFailed", "upgrading release %s: %v", name, err)
	case !dry:
		c.rec.Eventf(c.obj, corev1.EventTypeNormal, "Upgraded", "release %s upgraded to revision %d", name, rel.Version)
	}
	return rel, err
}

// ownerLabels returns labels with OwnerLabel set for the resource name.
func ownerLabels(labels map[string]string, name string) map[string]string {
	out := map[string]string{OwnerLabel: name}
	for k, v := range labels {
		if k != OwnerLabel {
			out[k] = v
		}
	}
	return out
}

func (c actionClient) Uninstall(name string, opts ...helmclient.UninstallOption) (*release.UninstallReleaseResponse, error) {
	resp, err := c.ActionInterface.Uninstall(name, opts...)
	switch {
	case errors.Is(err, driver.ErrReleaseNotFound):
	case err != nil:
		c.rec.Eventf(c.obj, corev1.EventTypeWarning, "UninstallFailed", "uninstalling release %s: %v", name, err)
	default:
		c.rec.Eventf(c.obj, corev1.EventTypeNormal, "Uninstalled", "release %s uninstalled; node mirror configuration restored", name)
	}
	return resp, err
}
