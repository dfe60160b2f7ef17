package operator

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/readiness"
)

// TestNodeReadiness: with nodeReadiness on, a node that joins without a
// ready agent gets the startup taint, a node registered with it loses it
// once its agent pod is Ready, and a node whose agent never gets ready
// keeps it, named with the reason in the NodesReady condition and a
// warning event. Pod status is set by the test: no kubelet runs.
func TestNodeReadiness(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fm-readiness"
	ensureNamespace(t, cl, ns)
	// Only nodes with this label run the agent here: other tests' nodes
	// are left alone, which is the nodeSelector path too.
	sel := map[string]any{"fleetmirror.dev/test": "readiness"}
	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", map[string]any{
		"nodeReadiness": map[string]any{"enabled": true},
		"components":    map[string]any{"spegel": map[string]any{"nodeSelector": sel}},
	}))
	applyAll(t, cl, manifests, false)
	defer forget(t, cl, ns, defaultSpegel)
	op := startOperator(t, manifests, c, time.Second)
	defer op.stop(t)

	ds := &appsv1.DaemonSet{}
	eventually(t, "the agent DaemonSet", time.Minute, func() error {
		return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds)
	})
	tolerates := false
	for _, tol := range ds.Spec.Template.Spec.Tolerations {
		tolerates = tolerates || (tol.Key == readiness.TaintKey && tol.Effect == corev1.TaintEffectNoSchedule)
	}
	if !tolerates {
		t.Fatalf("the agent does not tolerate the startup taint: %v", ds.Spec.Template.Spec.Tolerations)
	}

	node := func(name string, taints ...corev1.Taint) {
		t.Helper()
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"fleetmirror.dev/test": "readiness", "kubernetes.io/os": "linux"}}, Spec: corev1.NodeSpec{Taints: taints}}
		if err := cl.Create(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	pod := func(nodeName string) *corev1.Pod {
		t.Helper()
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "spegel-" + nodeName, Labels: ds.Spec.Template.Labels},
			Spec:       corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "agent", Image: ds.Spec.Template.Spec.Containers[0].Image}}},
		}
		if err := cl.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	setReady := func(p *corev1.Pod, ready bool, msg string) {
		t.Helper()
		st := corev1.ConditionFalse
		if ready {
			st = corev1.ConditionTrue
		}
		eventually(t, "pod status", 10*time.Second, func() error {
			if err := cl.Get(ctx, client.ObjectKeyFromObject(p), p); err != nil {
				return err
			}
			p.Status.Phase = corev1.PodRunning
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: st, Message: msg, LastTransitionTime: metav1.Now()}}
			return cl.Status().Update(ctx, p)
		})
	}
	tainted := func(name string) (bool, string) {
		n := &corev1.Node{}
		if err := cl.Get(ctx, client.ObjectKey{Name: name}, n); err != nil {
			t.Fatal(err)
		}
		for _, tt := range n.Spec.Taints {
			if tt.Key == readiness.TaintKey {
				return true, n.Annotations[readiness.ReadyAnnotation]
			}
		}
		return false, n.Annotations[readiness.ReadyAnnotation]
	}
	taintIs := func(name string, want bool) {
		t.Helper()
		eventually(t, fmt.Sprintf("node %s tainted=%v", name, want), 20*time.Second, func() error {
			if got, _ := tainted(name); got != want {
				return fmt.Errorf("tainted=%v", got)
			}
			return nil
		})
	}

	// Registered with the taint (a node pool's --register-with-taints), and
	// joined without it: both are held while their agent is not ready.
	node("rd-registered", startupTaint)
	node("rd-joined")
	node("rd-stuck", startupTaint)
	taintIs("rd-joined", true)
	pReg, pStuck := pod("rd-registered"), pod("rd-stuck")
	setReady(pStuck, false, "containers with unready status: [agent]")
	time.Sleep(time.Second)
	taintIs("rd-registered", true)

	// Its agent ready: the taint comes off and the node is marked.
	setReady(pReg, true, "")
	taintIs("rd-registered", false)
	if _, ann := tainted("rd-registered"); ann == "" {
		t.Error("a released node has no ready annotation")
	}

	// Never ready: the taint stays, the reason is in the status and an event.
	eventually(t, "NodesReady names the held nodes and why", 20*time.Second, func() error {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			return err
		}
		s, r, m := condition(u, readiness.ConditionType)
		if s != "False" || r != "NodesHeld" || !strings.Contains(m, "rd-stuck: agent pod spegel-rd-stuck not ready: containers with unready status: [agent]") ||
			!strings.Contains(m, "rd-joined: no agent pod") || strings.Contains(m, "rd-registered") {
			return fmt.Errorf("%s=%s %s %q", readiness.ConditionType, s, r, m)
		}
		return nil
	})
	eventually(t, "a NodeHeld warning event", 20*time.Second, func() error {
		var evs corev1.EventList
		if err := cl.List(ctx, &evs, client.InNamespace(ns)); err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Reason == "NodeHeld" && e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "rd-stuck") && strings.Contains(e.Message, "unready status") {
				return nil
			}
		}
		return fmt.Errorf("none among %d events", len(evs.Items))
	})
	if got, _ := tainted("rd-stuck"); !got {
		t.Error("a node whose agent never got ready lost its taint")
	}

	// Ready once, then the agent restarts: the node is not held again.
	setReady(pReg, false, "restarting")
	time.Sleep(2 * time.Second)
	if got, _ := tainted("rd-registered"); got {
		t.Error("a node whose agent was ready once was tainted again")
	}
	setReady(pStuck, true, "")
	taintIs("rd-stuck", false)
	for _, n := range []string{"rd-registered", "rd-joined", "rd-stuck"} {
		_ = cl.Delete(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}})
	}
}
