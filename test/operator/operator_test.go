package operator

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/fleetmirror/fleetmirror/operator/helmaction"
	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

var spegelGVK = schema.GroupVersionKind{Group: "charts.fleetmirror.dev", Version: "v1alpha1", Kind: "Spegel"}

func spegel(ns, name string, spec map[string]any) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
	u.SetGroupVersionKind(spegelGVK)
	u.SetNamespace(ns)
	u.SetName(name)
	return u
}

// eventually polls f until it returns nil or the deadline passes.
func eventually(t *testing.T, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %v", what, timeout, err)
}

func condition(u *unstructured.Unstructured, typ string) (status, reason, msg string) {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			s, _ := m["status"].(string)
			r, _ := m["reason"].(string)
			ms, _ := m["message"].(string)
			return s, r, ms
		}
	}
	return "", "", ""
}

func agentEnv(ds *appsv1.DaemonSet, name string) string {
	for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

// revisions lists the Helm release records of release name.
func revisions(ctx context.Context, cl client.Client, ns, name string) (int, error) {
	var l corev1.SecretList
	if err := cl.List(ctx, &l, client.InNamespace(ns), client.MatchingLabels{"owner": "helm", "name": name}); err != nil {
		return 0, err
	}
	maxV := 0
	for _, s := range l.Items {
		v, _ := strconv.Atoi(s.Labels["version"])
		maxV = max(maxV, v)
	}
	return maxV, nil
}

// reconcileStats reads the Helm controller's reconcile count and total
// seconds from controller-runtime's metrics.
func reconcileStats(t *testing.T) (count uint64, sum float64) {
	t.Helper()
	mfs, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "controller_runtime_reconcile_time_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelIs(m, "controller", "spegel-controller") {
				return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
			}
		}
	}
	return 0, 0
}

func labelIs(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}

func rssKiB() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// TestOperator runs the operator's manager against a real kube-apiserver
// and walks one Spegel resource through its life. Steps depend on each
// other, so it is one test with steps in order.
func TestOperator(t *testing.T) {
	needCluster(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"fm", "other"} {
		if err := cl.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}); err != nil {
			t.Fatal(err)
		}
	}
	// A failure part way must not leave the cluster's one resource behind
	// for the next test.
	t.Cleanup(func() {
		forget(t, cl, "fm", "spegel")
		forget(t, cl, "other", "spegel")
	})

	mgr, err := manager.New(cfg, manager.Options{
		WatchesFile:             filepath.Join(repoRoot, "watches.yaml"),
		Inputs:                  values.Inputs{Images: testImages},
		Timeouts:                helmaction.Timeouts{Install: time.Minute, Upgrade: time.Minute, Uninstall: time.Minute},
		MetricsAddr:             "0",
		ProbeAddr:               "127.0.0.1:0",
		LeaderElection:          true,
		LeaderElectionNamespace: "fm",
		SkipNameValidation:      true, // other tests start managers too
		// stderr, not t.Log: the manager may log after the test returned.
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	}()
	rssStart := rssKiB()

	get := func(ns, name string) *unstructured.Unstructured {
		u := spegel(ns, name, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			t.Fatalf("getting %s/%s: %v", ns, name, err)
		}
		return u
	}
	agentDS := func() (*appsv1.DaemonSet, error) {
		ds := &appsv1.DaemonSet{}
		return ds, cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel"}, ds)
	}

	// Create: DaemonSets, Services and the ServiceAccount appear with the
	// spec's values.
	created := time.Now()
	cr := spegel("fm", "spegel", map[string]any{
		"mirroredRegistries": []any{"https://docker.io", "https://ghcr.io"},
		"containerdPrep":     map[string]any{"enabled": true},
	})
	if err := cl.Create(ctx, cr); err != nil {
		t.Fatal(err)
	}
	eventually(t, "objects of the release", time.Minute, func() error {
		keys := []struct {
			o    client.Object
			name string
		}{{&appsv1.DaemonSet{}, "spegel"}, {&appsv1.DaemonSet{}, "spegel-containerd-prep"}, {&corev1.Service{}, "spegel"}, {&corev1.Service{}, "spegel-bootstrap"}, {&corev1.ServiceAccount{}, "spegel"}}
		for _, k := range keys {
			if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: k.name}, k.o); err != nil {
				return err
			}
		}
		return nil
	})
	createToObjects := time.Since(created)
	ds, _ := agentDS()
	if got := agentEnv(ds, "FLEETMIRROR_MIRRORED_REGISTRIES"); got != "https://docker.io,https://ghcr.io" {
		t.Errorf("mirrored registries in the DaemonSet: %q", got)
	}
	if got := agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"); got != "20ms" {
		t.Errorf("resolve timeout from the chart default: %q", got)
	}
	eventually(t, "Deployed condition and finalizer", 30*time.Second, func() error {
		u := get("fm", "spegel")
		if s, _, m := condition(u, "Deployed"); s != "True" {
			return fmt.Errorf("Deployed=%s %s", s, m)
		}
		if len(u.GetFinalizers()) == 0 {
			return fmt.Errorf("no finalizer")
		}
		return nil
	})
	if rev, _ := revisions(ctx, cl, "fm", "spegel"); rev != 1 {
		t.Fatalf("revision after install: %d", rev)
	}

	// Unchanged: a reconcile without a spec change makes no new revision.
	n0, s0 := reconcileStats(t)
	updateSpegel(t, cl, "fm", "spegel", func(u *unstructured.Unstructured) {
		u.SetAnnotations(map[string]string{"example.com/touch": "1"})
	})
	eventually(t, "a reconcile after the touch", 30*time.Second, func() error {
		if n, _ := reconcileStats(t); n < n0+1 {
			return fmt.Errorf("%d reconciles", n)
		}
		return nil
	})
	time.Sleep(time.Second) // let any further reconciles of the touch run
	n1, s1 := reconcileStats(t)
	if rev, _ := revisions(ctx, cl, "fm", "spegel"); rev != 1 {
		t.Fatalf("revision after a reconcile without a change: %d, want 1", rev)
	}
	unchanged := time.Duration((s1 - s0) / float64(n1-n0) * float64(time.Second))

	// A DaemonSet deleted by hand comes back.
	old, _ := agentDS()
	if err := cl.Delete(ctx, old); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the deleted DaemonSet restored", 30*time.Second, func() error {
		ds, err := agentDS()
		if err != nil {
			return err
		}
		if ds.UID == old.UID {
			return fmt.Errorf("still the old one")
		}
		return nil
	})

	// A spec change upgrades.
	setSpec := func(path []string, v any) {
		t.Helper()
		updateSpegel(t, cl, "fm", "spegel", func(u *unstructured.Unstructured) {
			if err := unstructured.SetNestedField(u.Object, v, append([]string{"spec"}, path...)...); err != nil {
				t.Fatal(err)
			}
		})
	}
	setSpec([]string{"mirrorResolveTimeout"}, "50ms")
	eventually(t, "upgrade to 50ms", 30*time.Second, func() error {
		ds, err := agentDS()
		if err != nil {
			return err
		}
		if got := agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"); got != "50ms" {
			return fmt.Errorf("timeout %q", got)
		}
		if rev, _ := revisions(ctx, cl, "fm", "spegel"); rev != 2 {
			return fmt.Errorf("revision %d, want 2", rev)
		}
		return nil
	})
	eventually(t, "an Upgraded event", 10*time.Second, func() error {
		var evs corev1.EventList
		if err := cl.List(ctx, &evs, client.InNamespace("fm")); err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Reason == "Upgraded" && e.InvolvedObject.Name == "spegel" {
				return nil
			}
		}
		return fmt.Errorf("no Upgraded event among %d", len(evs.Items))
	})

	// Ready follows the DaemonSets' status (set here: no kubelet runs).
	for _, n := range []string{"node-a", "node-b"} {
		if err := cl.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{"kubernetes.io/os": "linux"}}}); err != nil {
			t.Fatal(err)
		}
	}
	setDS := func(name string, desired, ready int32) {
		t.Helper()
		eventually(t, "setting status of "+name, 10*time.Second, func() error {
			ds := &appsv1.DaemonSet{}
			if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: name}, ds); err != nil {
				return err
			}
			ds.Status = appsv1.DaemonSetStatus{ObservedGeneration: ds.Generation, DesiredNumberScheduled: desired, CurrentNumberScheduled: desired,
				UpdatedNumberScheduled: desired, NumberReady: ready, NumberAvailable: ready, NumberUnavailable: desired - ready}
			return cl.Status().Update(ctx, ds)
		})
	}
	readyIs := func(want, reason string, nodes int64) {
		t.Helper()
		eventually(t, "Ready="+want, 20*time.Second, func() error {
			u := get("fm", "spegel")
			s, r, m := condition(u, "Ready")
			got, _, _ := unstructured.NestedInt64(u.Object, "status", "nodes", "ready")
			if s != want || r != reason || got != nodes {
				return fmt.Errorf("Ready=%s %s %q, nodes ready %d", s, r, m, got)
			}
			return nil
		})
	}
	readyIs("False", "NoNodes", 0)
	setDS("spegel", 2, 2)
	readyIs("False", "RolloutInProgress", 2) // prep not rolled out yet
	setDS("spegel-containerd-prep", 2, 2)
	readyIs("True", "RolloutComplete", 2)
	eventually(t, "observedGeneration", 10*time.Second, func() error {
		u := get("fm", "spegel")
		if og, _, _ := unstructured.NestedInt64(u.Object, "status", "observedGeneration"); og != u.GetGeneration() {
			return fmt.Errorf("observedGeneration %d, generation %d", og, u.GetGeneration())
		}
		return nil
	})
	setDS("spegel", 2, 1)
	readyIs("False", "RolloutInProgress", 1)
	setDS("spegel", 2, 2)
	readyIs("True", "RolloutComplete", 2)

	// Pause: spec changes wait until the annotation is gone.
	updateSpegel(t, cl, "fm", "spegel", func(u *unstructured.Unstructured) {
		u.SetAnnotations(map[string]string{manager.PauseAnnotation: "true"})
	})
	eventually(t, "Paused condition", 20*time.Second, func() error {
		if s, _, _ := condition(get("fm", "spegel"), "Paused"); s != "True" {
			return fmt.Errorf("Paused=%s", s)
		}
		return nil
	})
	setSpec([]string{"mirrorResolveTimeout"}, "70ms")
	time.Sleep(3 * time.Second)
	if ds, _ := agentDS(); agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT") != "50ms" {
		t.Fatalf("a paused resource was upgraded: %q", agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"))
	}
	updateSpegel(t, cl, "fm", "spegel", func(u *unstructured.Unstructured) { u.SetAnnotations(nil) })
	eventually(t, "upgrade after unpausing", 30*time.Second, func() error {
		ds, err := agentDS()
		if err != nil {
			return err
		}
		if got := agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"); got != "70ms" {
			return fmt.Errorf("timeout %q", got)
		}
		if s, _, _ := condition(get("fm", "spegel"), "Paused"); s != "False" {
			return fmt.Errorf("Paused=%s", s)
		}
		return nil
	})

	// Values the chart refuses (a combination the CRD's schema does not
	// check): a failed condition with the chart's message.
	setSpec([]string{"service"}, map[string]any{"registry": map[string]any{"type": "NodePort"}})
	eventually(t, "failed condition naming the value", 30*time.Second, func() error {
		s, r, m := condition(get("fm", "spegel"), "Irreconcilable")
		if s != "True" || !strings.Contains(m, "NodePort needs hostNetwork: false") {
			return fmt.Errorf("Irreconcilable=%s %s %q", s, r, m)
		}
		return nil
	})
	setSpec([]string{"service"}, map[string]any{"registry": map[string]any{"type": "ClusterIP"}})
	eventually(t, "recovered from the refused values", 30*time.Second, func() error {
		if s, _, m := condition(get("fm", "spegel"), "Irreconcilable"); s != "False" {
			return fmt.Errorf("Irreconcilable=%s %q", s, m)
		}
		return nil
	})

	// Invalid resources are refused by the API server, naming the field.
	for _, tc := range []struct {
		spec  map[string]any
		field string
	}{
		{map[string]any{"mirroredRegistries": []any{"docker.io"}}, "spec.mirroredRegistries[0]"},
		{map[string]any{"logLevel": "loud"}, "spec.logLevel"},
		{map[string]any{"mirrorResolveRetries": int64(0)}, "spec.mirrorResolveRetries"},
		{map[string]any{"image": map[string]any{"repository": "Registry/Agent"}}, "spec.image.repository"},
		{map[string]any{"containerdMirrorAdd": false, "prependExisting": true}, "spec.prependExisting"},
		{map[string]any{"privateRegistries": []any{"https://registry.corp"}}, "spec.privateRegistries[0]"},
		{map[string]any{"upstreamTags": []any{"docker.io:latest"}}, "spec.upstreamTags[0]"},
		{map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "lots"}}}, "spec.resources.limits.memory"},
		{map[string]any{"containerd": map[string]any{"certsDir": "etc/containerd/hosts.d"}}, "spec.containerd.certsDir"},
		{map[string]any{"ports": map[string]any{"registry": int64(70000)}}, "spec.ports.registry"},
		{map[string]any{"podLabels": map[string]any{"team": strings.Repeat("x", 64)}}, "spec.podLabels.team"},
		{map[string]any{"mirroredRegistries": []any{"https://docker.io", "https://docker.io"}}, "spec.mirroredRegistries[1]"},
	} {
		err := cl.Create(ctx, spegel("fm", "invalid", tc.spec))
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("spec %v: error %v, want Invalid naming %s", tc.spec, err, tc.field)
		}
	}

	// A second resource, in another namespace, is refused by the operator.
	if err := cl.Create(ctx, spegel("other", "spegel", map[string]any{})); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second resource refused", 30*time.Second, func() error {
		if s, _, m := condition(get("other", "spegel"), "Irreconcilable"); s != "True" || !strings.Contains(m, "only one Spegel") {
			return fmt.Errorf("Irreconcilable=%s %q", s, m)
		}
		return nil
	})
	if err := cl.Delete(ctx, spegel("other", "spegel", nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second resource gone", 30*time.Second, func() error {
		err := cl.Get(ctx, client.ObjectKey{Namespace: "other", Name: "spegel"}, spegel("", "", nil))
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("still there: %v", err)
	})
	var dss appsv1.DaemonSetList
	if err := cl.List(ctx, &dss, client.InNamespace("other")); err != nil || len(dss.Items) > 0 {
		t.Fatalf("the refused resource installed DaemonSets: %v %d", err, len(dss.Items))
	}
	rss := rssKiB()

	// Delete: the uninstall runs the node cleanup hook (its Role and
	// DaemonSet appear; the test completes the waiting Job, as no kubelet
	// runs), then removes the release and the finalizer.
	if err := cl.Delete(ctx, spegel("fm", "spegel", nil)); err != nil {
		t.Fatal(err)
	}
	job := &batchv1.Job{}
	eventually(t, "cleanup hook", 30*time.Second, func() error {
		if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup"}, &rbacv1.Role{}); err != nil {
			return err
		}
		if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup"}, &appsv1.DaemonSet{}); err != nil {
			return err
		}
		return cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup-wait"}, job)
	})
	if _, err := agentDS(); !apierrors.IsNotFound(err) {
		t.Errorf("agent DaemonSet still there while its cleanup runs: %v", err)
	}
	now := metav1.Now()
	job.Status = batchv1.JobStatus{StartTime: &now, CompletionTime: &now, Succeeded: 1, Conditions: []batchv1.JobCondition{
		{Type: batchv1.JobSuccessCriteriaMet, Status: corev1.ConditionTrue, LastTransitionTime: now, LastProbeTime: now},
		{Type: batchv1.JobComplete, Status: corev1.ConditionTrue, LastTransitionTime: now, LastProbeTime: now},
	}}
	if err := cl.Status().Update(ctx, job); err != nil {
		t.Fatalf("completing the cleanup Job: %v", err)
	}
	eventually(t, "resource, release and hooks gone", time.Minute, func() error {
		err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel"}, spegel("", "", nil))
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("resource still there: %v", err)
		}
		if rev, _ := revisions(ctx, cl, "fm", "spegel"); rev != 0 {
			return fmt.Errorf("release records left: revision %d", rev)
		}
		if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup"}, &appsv1.DaemonSet{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("cleanup DaemonSet left: %v", err)
		}
		return nil
	})

	t.Logf("FIGURES create->objects=%s unchanged-reconcile(avg of %d)=%s rss(test process: manager+client) start=%dMiB peak-ish=%dMiB",
		createToObjects.Round(time.Millisecond), n1-n0, unchanged.Round(time.Millisecond), rssStart/1024, rss/1024)
}
