package operator

import (
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/manager"
)

// ready: Ready follows the DaemonSets' status (set here: no kubelet runs).
func (l *lifecycle) ready(t *testing.T) {
	ctx, cl := l.ctx, l.cl
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
			u := l.get(t, "fm", "spegel")
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
		u := l.get(t, "fm", "spegel")
		if og, _, _ := unstructured.NestedInt64(u.Object, "status", "observedGeneration"); og != u.GetGeneration() {
			return fmt.Errorf("observedGeneration %d, generation %d", og, u.GetGeneration())
		}
		return nil
	})
	setDS("spegel", 2, 1)
	readyIs("False", "RolloutInProgress", 1)
	setDS("spegel", 2, 2)
	readyIs("True", "RolloutComplete", 2)
}

// pause: spec changes wait until the annotation is gone.
func (l *lifecycle) pause(t *testing.T) {
	cl := l.cl
	updateSpegel(t, cl, "fm", "spegel", func(u *unstructured.Unstructured) {
		u.SetAnnotations(map[string]string{manager.PauseAnnotation: "true"})
	})
	eventually(t, "Paused condition", 20*time.Second, func() error {
		if s, _, _ := condition(l.get(t, "fm", "spegel"), "Paused"); s != "True" {
			return fmt.Errorf("Paused=%s", s)
		}
		return nil
	})
	l.setSpec(t, []string{"mirrorResolveTimeout"}, "70ms")
	time.Sleep(3 * time.Second)
	if ds, _ := l.agentDS(); agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT") != "50ms" {
		t.Fatalf("a paused resource was upgraded: %q", agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"))
	}
	updateSpegel(t, cl, "fm", "spegel", func(u *unstructured.Unstructured) { u.SetAnnotations(nil) })
	eventually(t, "upgrade after unpausing", 30*time.Second, func() error {
		ds, err := l.agentDS()
		if err != nil {
			return err
		}
		if got := agentEnv(ds, "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT"); got != "70ms" {
			return fmt.Errorf("timeout %q", got)
		}
		if s, _, _ := condition(l.get(t, "fm", "spegel"), "Paused"); s != "False" {
			return fmt.Errorf("Paused=%s", s)
		}
		return nil
	})
}
