package operator

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/operator/manager"
)

// TestPeerHitRatio: the operator scrapes a real agent metrics endpoint at
// the agent pod's IP and puts the cluster's peer hit ratio in the status.
func TestPeerHitRatio(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// The agent's own metrics, served on loopback, where the pod's IP
	// (set by the test, as no kubelet runs) points.
	m := metrics.New(func() int { return 1 })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: m.Handler()}
	go srv.Serve(ln)
	defer srv.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	const ns = "fm-hitratio"
	ensureNamespace(t, cl, ns)
	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", nil))
	applyAll(t, cl, manifests, false)
	defer forget(t, cl, ns, defaultSpegel)
	op := startOperator(t, manifests, c, 0, func(o *manager.Options) {
		o.HitRatioWindow, o.AgentMetricsPort = 10*time.Minute, port
	})
	defer op.stop(t)

	ds := &appsv1.DaemonSet{}
	eventually(t, "the agent DaemonSet", time.Minute, func() error {
		return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds)
	})
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "spegel-agent-1", Labels: ds.Spec.Template.Labels},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "agent", Image: ds.Spec.Template.Spec.Containers[0].Image}}},
	}
	if err := cl.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	eventually(t, "pod IP", 10*time.Second, func() error {
		if err := cl.Get(ctx, client.ObjectKeyFromObject(p), p); err != nil {
			return err
		}
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIP, p.Status.PodIPs = "127.0.0.1", []corev1.PodIP{{IP: "127.0.0.1"}}
		return cl.Status().Update(ctx, p)
	})
	peerHits := func() map[string]any {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			t.Fatal(err)
		}
		h, _, _ := unstructured.NestedMap(u.Object, "status", "peerHits")
		return h
	}
	// The first scrape is the baseline: agents' counters from before it
	// are not the window's.
	m.Requests.WithLabelValues("docker.io", "blob", metrics.OutcomePeer).Add(50)
	eventually(t, "the agent scraped", 30*time.Second, func() error {
		if h := peerHits(); h["agents"] != "1/1" || h["ratio"] != nil {
			return fmt.Errorf("peerHits %v", h)
		}
		return nil
	})
	m.Requests.WithLabelValues("docker.io", "blob", metrics.OutcomePeer).Add(9)
	m.Requests.WithLabelValues("docker.io", "manifest", metrics.OutcomeMiss).Add(1)
	m.Requests.WithLabelValues("docker.io", "blob", metrics.OutcomeLocal).Add(40)
	// A pod change wakes the status controller, as agents coming and going do.
	eventually(t, "the ratio in the status", 30*time.Second, func() error {
		if err := cl.Get(ctx, client.ObjectKeyFromObject(p), p); err != nil {
			return err
		}
		p.Annotations = map[string]string{"poke": time.Now().String()}
		if err := cl.Update(ctx, p); err != nil {
			return err
		}
		if h := peerHits(); h["ratio"] != "0.90" || h["requests"] != int64(10) {
			return fmt.Errorf("peerHits %v, want ratio 0.90 over 10 requests", h)
		}
		return nil
	})
}
