package operator

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/networkkey"
	"github.com/fleetmirror/fleetmirror/operator/status"
)

// access is one question to the API server's authorizer.
type access struct {
	verb, group, resource, ns string
	want                      bool
}

// checkAccess asks the API server (SubjectAccessReview) whether user may
// do each of as, and fails for every answer that differs from want.
func checkAccess(t *testing.T, cl client.Client, user string, as []access) {
	t.Helper()
	for _, a := range as {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:               user,
			Groups:             []string{"system:serviceaccounts", "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: a.verb, Group: a.group, Resource: a.resource, Namespace: a.ns},
		}}
		if err := cl.Create(context.Background(), sar); err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != a.want {
			where := a.ns
			if where == "" {
				where = "every namespace"
			}
			t.Errorf("%s may %s %s.%s in %s: %v, want %v (%s)", user, a.verb, a.resource, a.group, where, sar.Status.Allowed, a.want, sar.Status.Reason)
		}
	}
}

// operatorUser is the operator's ServiceAccount as a user name.
func operatorUser(t *testing.T, manifests string) string {
	t.Helper()
	for _, o := range decodeAll(t, manifests) {
		if o.GetKind() == "ServiceAccount" && !strings.HasSuffix(o.GetName(), "-uninstall") {
			return "system:serviceaccount:" + o.GetNamespace() + ":" + o.GetName()
		}
	}
	t.Fatal("no ServiceAccount in the operator chart")
	return ""
}

// TestOperatorLeastPrivilege: the operator chart gives the operator its
// namespaced rights (Secrets, DaemonSets, Roles, RoleBindings, ...) in
// the managed namespaces only, which the API server's authorizer confirms
// and an impersonated request shows; the operator, running with exactly
// those rights, deploys a resource there and refuses one elsewhere with a
// condition saying how to fix it, creating nothing there.
func TestOperatorLeastPrivilege(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns, other = "fm-lp", "fm-lp-other"
	ensureNamespace(t, cl, ns)
	ensureNamespace(t, cl, other)
	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", nil))
	if len(c.ManagedNamespaces) != 1 || c.ManagedNamespaces[0] != ns {
		t.Fatalf("managedNamespaces %v, want the default resource's namespace %s", c.ManagedNamespaces, ns)
	}
	applyAll(t, cl, manifests, false)
	user := operatorUser(t, manifests)

	var as []access
	for _, r := range []struct{ group, resource string }{{"", "secrets"}, {"apps", "daemonsets"}, {"rbac.authorization.k8s.io", "roles"}, {"rbac.authorization.k8s.io", "rolebindings"}, {"", "configmaps"}, {"batch", "jobs"}} {
		for _, verb := range []string{"get", "list", "create", "delete"} {
			as = append(as, access{verb, r.group, r.resource, ns, true}, access{verb, r.group, r.resource, other, false},
				access{verb, r.group, r.resource, "kube-system", false}, access{verb, r.group, r.resource, "", false})
		}
	}
	as = append(as,
		access{"list", "", "pods", ns, true}, access{"list", "", "pods", other, false}, access{"list", "", "pods", "", false},
		// The kind it reconciles: everywhere, to refuse it outside its namespaces.
		access{"list", "charts.fleetmirror.dev", "spegels", "", true}, access{"patch", "charts.fleetmirror.dev", "spegels", other, true},
		access{"create", "rbac.authorization.k8s.io", "clusterroles", "", false},
		// Node readiness is off here: no node may be changed. The mirror
		// path condition (nodeConditions, on by default) is patched on the
		// status subresource only (SubjectAccessReview names it as
		// nodes/status in the subresource field, checked below).
		access{"patch", "", "nodes", "", false}, access{"get", "", "nodes", "", false},
	)
	checkAccess(t, cl, user, as)
	for _, sub := range []struct {
		verb string
		want bool
	}{{"patch", true}, {"update", false}, {"get", false}} {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User: user, Groups: []string{"system:serviceaccounts", "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: sub.verb, Resource: "nodes", Subresource: "status"},
		}}
		if err := cl.Create(ctx, sar); err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != sub.want {
			t.Errorf("%s may %s nodes/status: %v, want %v", user, sub.verb, sar.Status.Allowed, sub.want)
		}
	}

	// The same, as a request the operator makes.
	as2 := rest.CopyConfig(cfg)
	as2.Impersonate = rest.ImpersonationConfig{UserName: user}
	opc, err := client.New(as2, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := opc.List(ctx, &corev1.SecretList{}, client.InNamespace(other)); !apierrors.IsForbidden(err) {
		t.Errorf("the operator listed Secrets in %s: %v, want Forbidden", other, err)
	}
	if err := opc.List(ctx, &corev1.SecretList{}, client.InNamespace(ns)); err != nil {
		t.Errorf("the operator cannot list Secrets in its namespace %s: %v", ns, err)
	}

	defer forget(t, cl, ns, defaultSpegel)
	defer forget(t, cl, other, defaultSpegel)
	op := startOperator(t, manifests, c, 0)
	defer op.stop(t)
	get := func(ns string) (*unstructured.Unstructured, error) {
		u := spegel(ns, defaultSpegel, nil)
		return u, cl.Get(ctx, client.ObjectKeyFromObject(u), u)
	}
	eventually(t, "Deployed in the managed namespace", time.Minute, func() error {
		u, err := get(ns)
		if err != nil {
			return err
		}
		if s, _, m := condition(u, "Deployed"); s != "True" {
			return fmt.Errorf("Deployed=%s %s", s, m)
		}
		return nil
	})

	// A resource in a namespace the operator does not manage.
	if err := cl.Create(ctx, spegel(other, defaultSpegel, map[string]any{})); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the resource outside the managed namespaces refused", 30*time.Second, func() error {
		u, err := get(other)
		if err != nil {
			return err
		}
		s, r, m := condition(u, "Ready")
		if s != "False" || r != status.ReasonNamespaceNotManaged || !strings.Contains(m, "managedNamespaces={"+ns+","+other+"}") {
			return fmt.Errorf("Ready=%s %s %q", s, r, m)
		}
		if s, _, m := condition(u, "Irreconcilable"); s != "True" || !strings.Contains(m, "not managed by the operator") {
			return fmt.Errorf("Irreconcilable=%s %q", s, m)
		}
		return nil
	})
	var dss appsv1.DaemonSetList
	if err := cl.List(ctx, &dss, client.InNamespace(other)); err != nil || len(dss.Items) > 0 {
		t.Errorf("DaemonSets in the unmanaged namespace: %d (%v)", len(dss.Items), err)
	}
	if err := cl.Get(ctx, client.ObjectKey{Namespace: other, Name: networkkey.SecretName(defaultSpegel)}, &corev1.Secret{}); !apierrors.IsNotFound(err) {
		t.Errorf("a network key Secret in the unmanaged namespace: %v", err)
	}
	// Deleting it is not held up by a release the operator could never
	// have made there.
	if err := cl.Delete(ctx, spegel(other, defaultSpegel, nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the refused resource deleted", 30*time.Second, func() error {
		if _, err := get(other); !apierrors.IsNotFound(err) {
			return fmt.Errorf("still there: %v", err)
		}
		return nil
	})
}

// warnings collects the API server's warnings (PodSecurity's "would
// violate" for workloads in a namespace with a warn label).
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, msg string) {
	w.mu.Lock()
	w.msgs = append(w.msgs, msg)
	w.mu.Unlock()
}

func (w *warnings) take() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := strings.Join(w.msgs, "; ")
	w.msgs = nil
	return s
}

// TestPodSecurityLevels: the levels the README documents, checked by the
// API server's PodSecurity admission on every workload both charts render:
// the operator's pods pass "restricted"; the agent's need "privileged"
// (they fail "baseline": hostPath, hostNetwork).
func TestPodSecurityLevels(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	w := &warnings{}
	wc := rest.CopyConfig(cfg)
	wc.WarningHandler = w
	cl, err := client.New(wc, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for ns, level := range map[string]string{"fm-psa-restricted": "restricted", "fm-psa-baseline": "baseline"} {
		n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"pod-security.kubernetes.io/warn": level}}}
		if err := cl.Create(ctx, n); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	workloads := func(manifests, ns string) []*unstructured.Unstructured {
		var out []*unstructured.Unstructured
		for _, o := range decodeAll(t, manifests) {
			switch o.GetKind() {
			case "Deployment", "DaemonSet", "Job":
				o.SetNamespace(ns)
				out = append(out, o)
			}
		}
		return out
	}
	apply := func(o *unstructured.Unstructured) string {
		t.Helper()
		w.take()
		if err := cl.Patch(ctx, o, client.Apply, client.DryRunAll, client.FieldOwner("fleetmirror-test"), client.ForceOwnership); err != nil {
			t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
		}
		return w.take()
	}

	inst := action.NewInstall(&action.Configuration{})
	inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "fleetmirror", "fm-psa-restricted"
	inst.KubeVersion = kubeVersion
	rel, err := inst.Run(loadOperatorChart(t), operatorValues(t, "nebius", "", nil))
	if err != nil {
		t.Fatal(err)
	}
	all := rel.Manifest
	for _, h := range rel.Hooks {
		all += "\n---\n" + h.Manifest
	}
	ops := workloads(all, "fm-psa-restricted")
	if len(ops) < 2 {
		t.Fatalf("%d operator workloads (the Deployment and the uninstall Job expected)", len(ops))
	}
	for _, o := range ops {
		if warn := apply(o); warn != "" {
			t.Errorf("operator %s %s is not restricted: %s", o.GetKind(), o.GetName(), warn)
		}
	}

	vals := map[string]any{"containerdPrep": map[string]any{"enabled": true}}
	agents := workloads(render(t, loadChart(t), chartCase{Name: "psa", Spec: vals}), "fm-psa-baseline")
	var agentSeen bool
	for _, o := range agents {
		warn := apply(o)
		if o.GetKind() == "DaemonSet" && o.GetName() == "spegel" {
			agentSeen = true
			if !strings.Contains(warn, "hostPath") || !strings.Contains(warn, "host namespaces") {
				t.Errorf("the agent DaemonSet passes baseline (%q): the README's privileged level is wrong", warn)
			}
		}
	}
	if !agentSeen {
		t.Fatal("no agent DaemonSet rendered")
	}
}
