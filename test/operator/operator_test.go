package operator

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/fleetmirror/fleetmirror/operator/crd"
	"github.com/fleetmirror/fleetmirror/operator/helmaction"
	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

var spegelGVK = schema.GroupVersionKind{Group: crd.Group, Version: crd.Version, Kind: "Spegel"}

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

// lifecycle is one Spegel resource walked through its life by
// TestOperator's phases, each building on the ones before.
type lifecycle struct {
	ctx context.Context
	cl  client.Client
	// Figures logged at the end.
	createToObjects, unchanged time.Duration
	reconciles                 uint64
	rssStart, rss              int
}

// TestOperator runs the operator's manager against a real kube-apiserver
// and walks one Spegel resource through its life. Phases depend on each
// other: they run in order and stop at the first that fails.
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
	l := &lifecycle{ctx: ctx, cl: cl, rssStart: rssKiB()}
	for _, p := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"create", l.create},
		{"unchanged", l.unchangedSpec},
		{"restore", l.restore},
		{"upgrade", l.upgrade},
		{"ready", l.ready},
		{"pause", l.pause},
		{"refused-values", l.refusedValues},
		{"invalid", l.invalid},
		{"second-resource", l.secondResource},
		{"delete", l.delete},
	} {
		// A phase that ends in Fatal stops the rest, which build on it;
		// one that only reports errors lets them run and check theirs.
		ended := false
		t.Run(p.name, func(t *testing.T) { p.run(t); ended = true })
		if !ended {
			return
		}
	}
	t.Logf("FIGURES create->objects=%s unchanged-reconcile(avg of %d)=%s rss(test process: manager+client) start=%dMiB peak-ish=%dMiB",
		l.createToObjects.Round(time.Millisecond), l.reconciles, l.unchanged.Round(time.Millisecond), l.rssStart/1024, l.rss/1024)
}

// get reads the resource ns/name.
func (l *lifecycle) get(t *testing.T, ns, name string) *unstructured.Unstructured {
	t.Helper()
	u := spegel(ns, name, nil)
	if err := l.cl.Get(l.ctx, client.ObjectKeyFromObject(u), u); err != nil {
		t.Fatalf("getting %s/%s: %v", ns, name, err)
	}
	return u
}

// agentDS reads the release's agent DaemonSet.
func (l *lifecycle) agentDS() (*appsv1.DaemonSet, error) {
	ds := &appsv1.DaemonSet{}
	return ds, l.cl.Get(l.ctx, client.ObjectKey{Namespace: "fm", Name: "spegel"}, ds)
}

// setSpec sets one field of the resource's spec.
func (l *lifecycle) setSpec(t *testing.T, path []string, v any) {
	t.Helper()
	updateSpegel(t, l.cl, "fm", "spegel", func(u *unstructured.Unstructured) {
		if err := unstructured.SetNestedField(u.Object, v, append([]string{"spec"}, path...)...); err != nil {
			t.Fatal(err)
		}
	})
}
