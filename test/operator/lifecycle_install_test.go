package operator

import (
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// create: DaemonSets, Services and the ServiceAccount appear with the
// spec's values.
func (l *lifecycle) create(t *testing.T) {
	ctx, cl := l.ctx, l.cl
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
	l.createToObjects = time.Since(created)
	ds, _ := l.agentDS()
	if got := agentEnv(ds, "FLEETMIRROR_MIRRORED_REGISTRIES"); got != "https://docker.io,https://ghcr.io" {
		t.Errorf("mirrored registries in the DaemonSet: %q", got)
	}
	if got := agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"); got != "20ms" {
		t.Errorf("resolve timeout from the chart default: %q", got)
	}
	eventually(t, "Deployed condition and finalizer", 30*time.Second, func() error {
		u := l.get(t, "fm", "spegel")
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
}

// unchangedSpec: a reconcile without a spec change makes no new revision.
func (l *lifecycle) unchangedSpec(t *testing.T) {
	ctx, cl := l.ctx, l.cl
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
	l.reconciles = n1 - n0
	l.unchanged = time.Duration((s1 - s0) / float64(n1-n0) * float64(time.Second))
}

// restore: a DaemonSet deleted by hand comes back.
func (l *lifecycle) restore(t *testing.T) {
	ctx, cl := l.ctx, l.cl
	old, _ := l.agentDS()
	if err := cl.Delete(ctx, old); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the deleted DaemonSet restored", 30*time.Second, func() error {
		ds, err := l.agentDS()
		if err != nil {
			return err
		}
		if ds.UID == old.UID {
			return fmt.Errorf("still the old one")
		}
		return nil
	})
}

// upgrade: a spec change upgrades.
func (l *lifecycle) upgrade(t *testing.T) {
	ctx, cl := l.ctx, l.cl
	l.setSpec(t, []string{"mirrorResolveTimeout"}, "50ms")
	eventually(t, "upgrade to 50ms", 30*time.Second, func() error {
		ds, err := l.agentDS()
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
}
