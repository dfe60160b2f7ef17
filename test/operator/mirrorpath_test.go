package operator

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
)

// fakeCanary serves GET /canary as an agent does, on one loopback address
// per node (the pod IPs the test sets; no kubelet runs). The agent's side
// is proven against real containerd in test/e2e/canary_test.go.
type fakeCanary struct {
	mu      sync.Mutex
	verdict map[string]string // pod IP → JSON answer
	hits    int
}

func (f *fakeCanary) set(ip, verdict, step, reason string) {
	b, _ := json.Marshal(map[string]any{"verdict": verdict, "ok": verdict == "ok", "step": step, "reason": reason, "interval": "5m0s"})
	f.mu.Lock()
	f.verdict[ip] = string(b)
	f.mu.Unlock()
}

func (f *fakeCanary) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	host, _, _ := net.SplitHostPort(r.Host)
	f.mu.Lock()
	v, ok := f.verdict[host]
	f.hits++
	f.mu.Unlock()
	if r.URL.Path != "/canary" || !ok {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprint(w, v)
}

// listenLoopback serves h on each of ips at one port, which it returns.
func listenLoopback(t *testing.T, h http.Handler, ips ...string) int {
	t.Helper()
	port := 0
	for _, ip := range ips {
		ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			t.Fatal(err)
		}
		port = ln.Addr().(*net.TCPAddr).Port
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}
	return port
}

// TestMirrorPathReported: the operator reads each agent's /canary and
// writes the node's FleetmirrorMirrorPath condition (False with the step
// and the agent's reason for a broken node, True again once fixed, Unknown
// while pending) and sums it up in the Spegel status, naming the failing
// node, with the chart's RBAC (patch on nodes/status only).
func TestMirrorPathReported(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	canary := &fakeCanary{verdict: map[string]string{}}
	ips := map[string]string{"mp-good": "127.0.0.11", "mp-broken": "127.0.0.12", "mp-pending": "127.0.0.13"}
	port := listenLoopback(t, canary, "127.0.0.11", "127.0.0.12", "127.0.0.13")
	const reason = "containerd does not keep the canary's layer once it is unpacked: discard_unpacked_layers = true; set it to false and restart containerd"
	canary.set(ips["mp-good"], "ok", "", "")
	canary.set(ips["mp-broken"], "failed", "content", reason)
	canary.set(ips["mp-pending"], "pending", "", "")

	const ns = "fm-mirrorpath"
	ensureNamespace(t, cl, ns)
	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", nil))
	if !c.NodeConditions {
		t.Fatal("the operator chart does not turn node conditions on by default")
	}
	applyAll(t, cl, manifests, false)
	defer forget(t, cl, ns, defaultSpegel)
	op := startOperator(t, manifests, c, 0, func(o *manager.Options) {
		o.MirrorPath, o.HitRatioWindow, o.AgentMetricsPort = true, 0, port
	})
	defer op.stop(t)

	ds := &appsv1.DaemonSet{}
	eventually(t, "the agent DaemonSet", time.Minute, func() error {
		return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds)
	})
	for node, ip := range ips {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}
		if err := cl.Create(ctx, n); err != nil {
			t.Fatal(err)
		}
		defer cl.Delete(ctx, n)
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "spegel-" + node, Labels: ds.Spec.Template.Labels},
			Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "agent", Image: ds.Spec.Template.Spec.Containers[0].Image}}},
		}
		if err := cl.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		eventually(t, "pod IP", 10*time.Second, func() error {
			if err := cl.Get(ctx, client.ObjectKeyFromObject(p), p); err != nil {
				return err
			}
			p.Status.Phase = corev1.PodRunning
			p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
			return cl.Status().Update(ctx, p)
		})
	}

	cond := func(node string) (corev1.NodeCondition, int) {
		n := &corev1.Node{}
		if err := cl.Get(ctx, client.ObjectKey{Name: node}, n); err != nil {
			t.Fatal(err)
		}
		count := 0
		var found corev1.NodeCondition
		for _, c := range n.Status.Conditions {
			if c.Type == mirrorpath.ConditionType {
				count++
				found = c
			}
		}
		return found, count
	}
	condIs := func(node, status, reason, msg string) {
		t.Helper()
		// One check period is a minute; pod changes wake it sooner.
		eventually(t, fmt.Sprintf("%s %s=%s %s", node, mirrorpath.ConditionType, status, reason), 90*time.Second, func() error {
			c, count := cond(node)
			if count != 1 || string(c.Status) != status || c.Reason != reason || !strings.Contains(c.Message, msg) {
				return fmt.Errorf("%d conditions, last %s %s %q", count, c.Status, c.Reason, c.Message)
			}
			return nil
		})
	}
	mirror := func() map[string]any {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			t.Fatal(err)
		}
		m, _, _ := unstructured.NestedMap(u.Object, "status", "mirrorPath")
		return m
	}

	condIs("mp-good", "True", "CanaryPulled", "proven")
	condIs("mp-broken", "False", "CanaryFailedContent", "step content: "+reason)
	condIs("mp-pending", "Unknown", "CanaryPending", "")
	eventually(t, "status.mirrorPath names the failing node", 90*time.Second, func() error {
		m := mirror()
		f, _ := m["failing"].([]any)
		if m["proven"] != int64(1) || m["total"] != int64(3) || m["summary"] != "1/3" || len(f) != 1 {
			return fmt.Errorf("mirrorPath %v", m)
		}
		first, _ := f[0].(map[string]any)
		if first["node"] != "mp-broken" || first["step"] != "content" || first["reason"] != reason {
			return fmt.Errorf("failing %v", first)
		}
		return nil
	})

	// Fixed: True again within a period, and the status follows.
	canary.set(ips["mp-broken"], "ok", "", "")
	canary.set(ips["mp-pending"], "ok", "", "")
	before, _ := cond("mp-good")
	condIs("mp-broken", "True", "CanaryPulled", "proven")
	condIs("mp-pending", "True", "CanaryPulled", "proven")
	eventually(t, "status.mirrorPath all proven", 90*time.Second, func() error {
		if m := mirror(); m["summary"] != "3/3" || len(m["failing"].([]any)) != 0 {
			return fmt.Errorf("mirrorPath %v", m)
		}
		return nil
	})
	// An unchanged condition is not rewritten (nor its transition moved).
	if after, _ := cond("mp-good"); !after.LastTransitionTime.Equal(&before.LastTransitionTime) || !after.LastHeartbeatTime.Equal(&before.LastHeartbeatTime) {
		t.Errorf("an unchanged condition was rewritten: %v then %v", before, after)
	}

	// The resource goes, and with it the condition from every node; the
	// node's other conditions stay.
	n := &corev1.Node{}
	if err := cl.Get(ctx, client.ObjectKey{Name: "mp-good"}, n); err != nil {
		t.Fatal(err)
	}
	n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{Type: "ExampleKubeletCondition", Status: corev1.ConditionTrue, Reason: "Test"})
	if err := cl.Status().Update(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := cl.Delete(ctx, spegel(ns, defaultSpegel, nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the condition off every node once the resource is deleted", time.Minute, func() error {
		for node := range ips {
			if _, count := cond(node); count != 0 {
				return fmt.Errorf("%s still has %s", node, mirrorpath.ConditionType)
			}
		}
		return nil
	})
	if err := cl.Get(ctx, client.ObjectKey{Name: "mp-good"}, n); err != nil {
		t.Fatal(err)
	}
	if len(n.Status.Conditions) != 1 || n.Status.Conditions[0].Type != "ExampleKubeletCondition" {
		t.Errorf("mp-good's other conditions: %+v", n.Status.Conditions)
	}
}
