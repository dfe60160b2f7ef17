package operator

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/agent/nodetaint"
	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/readiness"
)

// failOpenSetup makes a namespace and the operator chart's manifests with
// node readiness on (its RBAC and admission policy applied), and returns
// helpers over nodes.
func failOpenSetup(t *testing.T, ns, label string) (client.Client, string, func(string) *corev1.Node) {
	t.Helper()
	if nodetaint.TaintKey != readiness.TaintKey {
		t.Fatalf("the agent removes %s, the operator puts %s", nodetaint.TaintKey, readiness.TaintKey)
	}
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ensureNamespace(t, cl, ns)
	manifests, _ := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", map[string]any{
		"nodeReadiness": map[string]any{"enabled": true},
		"components":    map[string]any{"spegel": map[string]any{"nodeSelector": map[string]any{"fleetmirror.dev/test": label}}},
	}))
	applyAll(t, cl, manifests, false)
	get := func(name string) *corev1.Node {
		n := &corev1.Node{}
		if err := cl.Get(context.Background(), client.ObjectKey{Name: name}, n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	return cl, manifests, get
}

func hasStartupTaint(n *corev1.Node) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == readiness.TaintKey {
			return true
		}
	}
	return false
}

func waitEvent(t *testing.T, cl client.Client, ns, reason string, has ...string) {
	t.Helper()
	eventually(t, "a "+reason+" event", 30*time.Second, func() error {
		var evs corev1.EventList
		if err := cl.List(context.Background(), &evs, client.InNamespace(ns)); err != nil {
			return err
		}
	next:
		for _, e := range evs.Items {
			if e.Reason != reason || e.Type != corev1.EventTypeWarning {
				continue
			}
			for _, h := range has {
				if !strings.Contains(e.Message, h) {
					continue next
				}
			}
			return nil
		}
		return fmt.Errorf("none among %d events", len(evs.Items))
	})
}

// TestNodeReleasedAfterBound (issue 16, f): a node whose agent never gets
// ready is held at most releaseAfter, then released with a warning event,
// an annotation and the reason in NodesReady, and never held again; the
// agents get the bound (plus a minute) for their own fallback.
func TestNodeReleasedAfterBound(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	const ns = "fm-failopen"
	cl, manifests, get := failOpenSetup(t, ns, "failopen")
	defer forget(t, cl, ns, defaultSpegel)
	_, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", map[string]any{"nodeReadiness": map[string]any{"enabled": true}}))
	const bound = 8 * time.Second
	op := startOperator(t, manifests, c, time.Hour, func(o *manager.Options) { o.ReleaseAfter = bound })
	defer op.stop(t)

	ds := &appsv1.DaemonSet{}
	eventually(t, "the agent DaemonSet", time.Minute, func() error {
		return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds)
	})
	if got := agentEnv(ds, "FLEETMIRROR_RELEASE_TAINT_AFTER"); got != (bound + time.Minute).String() {
		t.Errorf("the agents' fallback bound is %q, want the operator's plus a minute, %s", got, bound+time.Minute)
	}

	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "fo-stuck", Labels: map[string]string{"fleetmirror.dev/test": "failopen", "kubernetes.io/os": "linux"}},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{startupTaint}}}
	if err := cl.Create(ctx, n); err != nil {
		t.Fatal(err)
	}
	defer cl.Delete(ctx, n)
	created := time.Now()
	eventually(t, "NodesReady says fo-stuck is held, and for how long at most", 10*time.Second, func() error {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			return err
		}
		if s, r, m := condition(u, readiness.ConditionType); s != "False" || r != "NodesHeld" || !strings.Contains(m, "fo-stuck: no agent pod") || !strings.Contains(m, "at most 8s") {
			return fmt.Errorf("%s %s %q", s, r, m)
		}
		return nil
	})
	if !hasStartupTaint(get("fo-stuck")) {
		t.Fatal("the node lost its taint before the bound")
	}
	eventually(t, "fo-stuck released past the bound", 2*bound, func() error {
		if n := get("fo-stuck"); hasStartupTaint(n) || !strings.Contains(n.Annotations[readiness.ReleasedAnnotation], "no agent pod") {
			return fmt.Errorf("tainted %v, annotation %q", hasStartupTaint(n), n.Annotations[readiness.ReleasedAnnotation])
		}
		return nil
	})
	if took := time.Since(created); took < bound-time.Second || took > bound+10*time.Second {
		t.Errorf("released after %s, want about %s", took, bound)
	}
	waitEvent(t, cl, ns, "NodeReleasedUnready", "fo-stuck", "released after 8s", "no agent pod")
	eventually(t, "NodesReady names the released node", 10*time.Second, func() error {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			return err
		}
		if s, r, m := condition(u, readiness.ConditionType); s != "False" || r != "NodesReleasedUnready" || !strings.Contains(m, "released after 8s without a ready agent") || !strings.Contains(m, "fo-stuck: no agent pod") {
			return fmt.Errorf("%s %s %q", s, r, m)
		}
		return nil
	})
	// Its agent still not ready: never held again.
	time.Sleep(3 * time.Second)
	if hasStartupTaint(get("fo-stuck")) {
		t.Error("a released node was tainted again")
	}
}

// TestAgentReleasesOwnNode (issue 16, f): with the operator scaled to zero,
// a node that joins with the startup taint is released by its own agent
// past the bound, with the pod's bound service account token: the operator
// chart's RBAC and admission policy let it remove that taint from its own
// node and nothing else. When the operator is back, it reports the release.
func TestAgentReleasesOwnNode(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	const ns = "fm-agentrelease"
	cl, manifests, get := failOpenSetup(t, ns, "agentrelease")
	defer forget(t, cl, ns, defaultSpegel)

	// The agent's account as the spegel chart would make it (Helm adopts it
	// when the operator comes back).
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: defaultSpegel,
		Labels:      map[string]string{"app.kubernetes.io/managed-by": "Helm"},
		Annotations: map[string]string{"meta.helm.sh/release-name": defaultSpegel, "meta.helm.sh/release-namespace": ns}}}
	if err := cl.Create(ctx, sa); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	other := corev1.Taint{Key: "example.com/gpu", Value: "true", Effect: corev1.TaintEffectNoSchedule}
	for _, name := range []string{"ar-late", "ar-neighbour"} {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"fleetmirror.dev/test": "agentrelease", "kubernetes.io/os": "linux"}},
			Spec: corev1.NodeSpec{Taints: []corev1.Taint{other, startupTaint}}}
		if err := cl.Create(ctx, n); err != nil {
			t.Fatal(err)
		}
		defer cl.Delete(ctx, n)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "agent-ar-late"},
		Spec: corev1.PodSpec{NodeName: "ar-late", ServiceAccountName: defaultSpegel, Containers: []corev1.Container{{Name: "agent", Image: "example.invalid/agent:test"}}}}
	if err := cl.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	defer cl.Delete(ctx, pod)

	// A token bound to the pod, as the kubelet mounts it.
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, defaultSpegel, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: types.UID(pod.UID)},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	asAgent := rest.AnonymousClientConfig(cfg)
	asAgent.BearerToken = tr.Status.Token
	agentCS, err := kubernetes.NewForConfig(asAgent)
	if err != nil {
		t.Fatal(err)
	}
	// Kubernetes 1.30+ puts the pod's node in the token's user info: the
	// admission policy relies on it.
	rev, err := agentCS.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := rev.Status.UserInfo.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != "ar-late" {
		t.Fatalf("the bound token's extra has node-name %v, want [ar-late] (user info %+v)", got, rev.Status.UserInfo)
	}

	dir := t.TempDir()
	tokenFile, caFile := filepath.Join(dir, "token"), filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(tokenFile, []byte(tr.Status.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caFile, cfg.CAData, 0o600); err != nil {
		t.Fatal(err)
	}
	api := strings.TrimRight(cfg.Host, "/")
	if !strings.Contains(api, "://") {
		api = "https://" + api
	}
	releaser := func(node string, after time.Duration) *nodetaint.Releaser {
		rel, err := nodetaint.New(node, after, api, tokenFile, caFile, nodetaint.WithPeriod(500*time.Millisecond),
			nodetaint.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))))
		if err != nil {
			t.Fatal(err)
		}
		return rel
	}

	// The policy is in force once a dry-run change of a label is denied.
	eventually(t, "the admission policy in force", 30*time.Second, func() error {
		_, err := agentCS.CoreV1().Nodes().Patch(ctx, "ar-late", types.MergePatchType, []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}})
		if !apierrors.IsForbidden(err) {
			return fmt.Errorf("dry-run label change: %v", err)
		}
		return nil
	})

	// Before the bound it leaves the taint.
	if wait, err := releaser("ar-late", time.Hour).Check(ctx); err != nil || wait < 50*time.Minute || !hasStartupTaint(get("ar-late")) {
		t.Fatalf("before the bound: wait %s, err %v, tainted %v (API %s)", wait, err, hasStartupTaint(get("ar-late")), cfg.Host)
	}
	// The neighbour's taint: denied by the admission policy, though RBAC allows the patch.
	if _, err := releaser("ar-neighbour", time.Millisecond).Check(ctx); err == nil || !strings.Contains(err.Error(), "only its own node") {
		t.Errorf("the agent released another node: %v", err)
	}
	if !hasStartupTaint(get("ar-neighbour")) {
		t.Error("the neighbour lost its startup taint")
	}
	// Anything else on its own node: denied.
	for what, patch := range map[string]string{
		"a label":                           `{"metadata":{"labels":{"x":"y"}}}`,
		"an annotation":                     `{"metadata":{"annotations":{"x":"y"}}}`,
		"the operator's release annotation": `{"metadata":{"annotations":{"fleetmirror.dev/released-unready":"y"}}}`,
		"another taint":                     `{"spec":{"taints":[]}}`,
		"unschedulable":                     `{"spec":{"unschedulable":true}}`,
		"the startup taint":                 `{"spec":{"taints":[{"key":"example.com/gpu","value":"true","effect":"NoSchedule"},{"key":"fleetmirror.dev/agent-not-ready","effect":"NoSchedule"},{"key":"fleetmirror.dev/agent-not-ready","effect":"NoExecute"}]}}`,
	} {
		_, err := agentCS.CoreV1().Nodes().Patch(ctx, "ar-late", types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		if !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("the agent changed %s on its node: %v", what, err)
		}
	}
	if err := agentCS.CoreV1().Nodes().Delete(ctx, "ar-late", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the agent deleted its node: %v", err)
	}

	// Past the bound, with no operator: the agent releases its node and
	// keeps its other taint.
	const bound = 4 * time.Second
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	releaser("ar-late", bound).Run(rctx)
	if rctx.Err() != nil {
		t.Fatalf("the releaser ran out of time: %v", rctx.Err())
	}
	n := get("ar-late")
	kept := false
	for _, tt := range n.Spec.Taints {
		kept = kept || tt == other
	}
	if hasStartupTaint(n) || !kept {
		t.Fatalf("after the agent's release: taints %v, want %v kept and no startup taint", n.Spec.Taints, other)
	}
	// It says why on the node: the admission policy lets that one annotation come.
	if why := n.Annotations[nodetaint.ReleasedAnnotation]; !strings.Contains(why, "released by its agent") {
		t.Errorf("after the agent's release: annotations %v, want %s saying why", n.Annotations, nodetaint.ReleasedAnnotation)
	}
	if took := time.Since(n.CreationTimestamp.Time); took > bound+10*time.Second {
		t.Errorf("released %s after the node joined, bound %s", took, bound)
	}

	// The operator back: it never holds the node again, and reports it.
	_, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", map[string]any{"nodeReadiness": map[string]any{"enabled": true}}))
	op := startOperator(t, manifests, c, time.Hour, func(o *manager.Options) { o.ReleaseAfter = bound })
	defer op.stop(t)
	waitEvent(t, cl, ns, "NodeReleasedUnready", "ar-late")
	eventually(t, "the operator marks the node released", 30*time.Second, func() error {
		if n := get("ar-late"); n.Annotations[readiness.ReleasedAnnotation] == "" || hasStartupTaint(n) {
			return fmt.Errorf("annotations %v, taints %v", n.Annotations, n.Spec.Taints)
		}
		return nil
	})
}
