package operator

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"

	helmclient "github.com/operator-framework/helm-operator-plugins/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/networkkey"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

// keyFile is where the chart mounts the network key, as the agent's
// FLEETMIRROR_NETWORK_KEY_FILE names it; it checks the two agree.
func keyFile(t *testing.T, ds *appsv1.DaemonSet) (secret string) {
	t.Helper()
	path := agentEnv(ds, "FLEETMIRROR_NETWORK_KEY_FILE")
	c := ds.Spec.Template.Spec.Containers[0]
	for _, m := range c.VolumeMounts {
		if path != m.MountPath+"/key" {
			continue
		}
		if !m.ReadOnly {
			t.Errorf("the network key is mounted writable")
		}
		for _, v := range ds.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.Secret != nil && len(v.Secret.Items) == 1 && v.Secret.Items[0].Key == networkkey.Key && v.Secret.Items[0].Path == "key" {
				return v.Secret.SecretName
			}
		}
	}
	t.Fatalf("FLEETMIRROR_NETWORK_KEY_FILE=%q is no Secret's key mounted in the agent: %v", path, c.VolumeMounts)
	return ""
}

func decodeDS(t *testing.T, manifests string) *appsv1.DaemonSet {
	t.Helper()
	for _, o := range decodeAll(t, manifests) {
		if o.GetKind() == "DaemonSet" && o.GetName() == "spegel" {
			ds := &appsv1.DaemonSet{}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, ds); err != nil {
				t.Fatal(err)
			}
			return ds
		}
	}
	t.Fatal("no agent DaemonSet rendered")
	return nil
}

func isKey(s string) bool {
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == 32
}

// TestChartNetworkKey: without the operator the chart makes the Secret
// with a 64-hex-digit key and mounts it where the agent's env says; a
// named Secret is mounted and none is made; the agent flags' env twins
// carry privateRegistries and upstreamTags.
func TestChartNetworkKey(t *testing.T) {
	ch := loadChart(t)
	spec := map[string]any{"privateRegistries": []any{"registry.corp.example:5000", "10.0.0.5:5000"},
		"upstreamTags": []any{":latest", "docker.io/library/nginx", "ghcr.io/org/app:main"}}
	vals, err := values.Translate(spec, "", values.Inputs{Images: testImages})
	if err != nil {
		t.Fatal(err)
	}
	inst := action.NewInstall(&action.Configuration{})
	inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "spegel", "spegel"
	inst.KubeVersion = kubeVersion
	rel, err := inst.Run(ch, vals)
	if err != nil {
		t.Fatal(err)
	}
	ds := decodeDS(t, rel.Manifest)
	if got := keyFile(t, ds); got != "spegel-network-key" {
		t.Errorf("the agent mounts Secret %q, want the chart's own spegel-network-key", got)
	}
	var secrets int
	for _, o := range decodeAll(t, rel.Manifest) {
		if o.GetKind() != "Secret" {
			continue
		}
		secrets++
		s := &corev1.Secret{}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, s); err != nil {
			t.Fatal(err)
		}
		if o.GetName() != "spegel-network-key" || !isKey(string(s.Data[networkkey.Key])) {
			t.Errorf("Secret %s: key %q, want 64 hex digits in spegel-network-key", o.GetName(), s.Data[networkkey.Key])
		}
	}
	if secrets != 1 {
		t.Errorf("%d Secrets rendered, want the network key only", secrets)
	}
	if got := agentEnv(ds, "FLEETMIRROR_PRIVATE_REGISTRIES"); got != "registry.corp.example:5000,10.0.0.5:5000" {
		t.Errorf("FLEETMIRROR_PRIVATE_REGISTRIES=%q", got)
	}
	if got := agentEnv(ds, "FLEETMIRROR_UPSTREAM_TAGS"); got != ":latest,docker.io/library/nginx,ghcr.io/org/app:main" {
		t.Errorf("FLEETMIRROR_UPSTREAM_TAGS=%q", got)
	}

	// A named Secret: mounted, none made.
	named := render(t, ch, chartCase{Name: "named", Spec: map[string]any{"networkKey": map[string]any{"secretName": "corp-key"}}})
	if got := keyFile(t, decodeDS(t, named)); got != "corp-key" {
		t.Errorf("the agent mounts %q, want the named corp-key", got)
	}
	for _, o := range decodeAll(t, named) {
		if o.GetKind() == "Secret" {
			t.Errorf("Secret %s rendered although the values name one", o.GetName())
		}
	}
}

// plainInstall installs the addon chart as release name in ns with a plain
// `helm install` (no owner on the release records, no operator label),
// uninstalled when the test ends.
func plainInstall(t *testing.T, ns, name string) (*action.Configuration, *chart.Chart, map[string]any) {
	t.Helper()
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mapper, err := apiutil.NewDynamicRESTMapper(cfg, httpClient)
	if err != nil {
		t.Fatal(err)
	}
	acg, err := helmclient.NewActionConfigGetter(cfg, mapper, helmclient.DisableStorageOwnerRefInjection(true))
	if err != nil {
		t.Fatal(err)
	}
	acfg, err := acg.ActionConfigFor(context.Background(), spegel(ns, name, nil))
	if err != nil {
		t.Fatal(err)
	}
	vals, err := values.Translate(nil, "", values.Inputs{Images: testImages})
	if err != nil {
		t.Fatal(err)
	}
	ch := loadChart(t)
	inst := action.NewInstall(acfg)
	inst.ReleaseName, inst.Namespace = name, ns
	if _, err := inst.Run(ch, vals); err != nil {
		t.Fatalf("helm install: %v", err)
	}
	t.Cleanup(func() {
		u := action.NewUninstall(acfg)
		u.DisableHooks = true // the node cleanup hook needs kubelets
		if _, err := u.Run(name); err != nil {
			t.Errorf("helm uninstall: %v", err)
		}
	})
	return acfg, ch, vals
}

// TestChartNetworkKeyKept: a plain `helm install` of the chart against a
// real API server makes the key once; upgrades keep it, and keep a key the
// user rotated by hand.
func TestChartNetworkKeyKept(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fm-chartkey"
	ensureNamespace(t, cl, ns)
	acfg, ch, vals := plainInstall(t, ns, "spegel")
	key := func() string {
		t.Helper()
		s := &corev1.Secret{}
		if err := cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: "spegel-network-key"}, s); err != nil {
			t.Fatal(err)
		}
		return string(s.Data[networkkey.Key])
	}
	upgrade := func(vals map[string]any) {
		t.Helper()
		up := action.NewUpgrade(acfg)
		up.Namespace = ns
		if _, err := up.Run("spegel", ch, vals); err != nil {
			t.Fatalf("helm upgrade: %v", err)
		}
	}
	first := key()
	if !isKey(first) {
		t.Fatalf("installed key %q, want 64 hex digits", first)
	}
	vals["logLevel"] = "debug"
	upgrade(vals)
	if got := key(); got != first {
		t.Fatalf("an upgrade changed the key: %q, was %q", got, first)
	}
	// Rotation: the user replaces the key; the next upgrade keeps it.
	rotated := strings.Repeat("ab", 32)
	s := &corev1.Secret{}
	if err := cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: "spegel-network-key"}, s); err != nil {
		t.Fatal(err)
	}
	s.Data[networkkey.Key] = []byte(rotated)
	if err := cl.Update(ctx, s); err != nil {
		t.Fatal(err)
	}
	vals["logLevel"] = "info"
	upgrade(vals)
	if got := key(); got != rotated {
		t.Fatalf("an upgrade replaced the rotated key: %q", got)
	}
}

// TestOperatorNetworkKey: the operator, running with its chart's RBAC,
// makes one Secret per resource (owned by it, a random 64-hex-digit key),
// names it in the release, never rewrites it (a rotated key stays, and a
// reconcile makes no new revision), makes a new one when it is deleted, and
// refuses a spec naming a Secret that does not exist.
func TestOperatorNetworkKey(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fm-netkey"
	ensureNamespace(t, cl, ns)
	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", nil))
	applyAll(t, cl, manifests, false)
	defer forget(t, cl, ns, defaultSpegel)
	op := startOperator(t, manifests, c, 0)
	defer op.stop(t)

	name := networkkey.SecretName(defaultSpegel)
	secret := func() (*corev1.Secret, error) {
		s := &corev1.Secret{}
		return s, cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, s)
	}
	ds := &appsv1.DaemonSet{}
	eventually(t, "the agent DaemonSet", time.Minute, func() error {
		return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds)
	})
	if got := keyFile(t, ds); got != name {
		t.Errorf("the agent mounts %q, want the operator's %s", got, name)
	}
	s, err := secret()
	if err != nil {
		t.Fatalf("the operator's network key Secret: %v", err)
	}
	owner := spegel(ns, defaultSpegel, nil)
	if err := cl.Get(ctx, client.ObjectKeyFromObject(owner), owner); err != nil {
		t.Fatal(err)
	}
	if refs := s.OwnerReferences; len(refs) != 1 || refs[0].UID != owner.GetUID() || refs[0].Controller == nil || !*refs[0].Controller {
		t.Errorf("owner references %v, want the Spegel resource as controller", refs)
	}
	if !isKey(string(s.Data[networkkey.Key])) {
		t.Errorf("key %q, want 64 hex digits", s.Data[networkkey.Key])
	}
	eventually(t, "Deployed", 30*time.Second, func() error {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			return err
		}
		if st, _, m := condition(u, "Deployed"); st != "True" {
			return fmt.Errorf("Deployed=%s %s", st, m)
		}
		return nil
	})

	// Rotation by hand: the operator keeps the new key; the release does
	// not change (the values name the Secret, not its content).
	rotated := strings.Repeat("cd", 32)
	s.Data[networkkey.Key] = []byte(rotated)
	if err := cl.Update(ctx, s); err != nil {
		t.Fatal(err)
	}
	n0, _ := reconcileStats(t)
	updateSpegel(t, cl, ns, defaultSpegel, func(u *unstructured.Unstructured) {
		u.SetAnnotations(map[string]string{"example.com/touch": "1"})
	})
	eventually(t, "a reconcile after the rotation", 30*time.Second, func() error {
		if n, _ := reconcileStats(t); n < n0+1 {
			return fmt.Errorf("no reconcile yet")
		}
		return nil
	})
	time.Sleep(time.Second)
	if s, err := secret(); err != nil || string(s.Data[networkkey.Key]) != rotated {
		t.Fatalf("the rotated key was not kept: %v %q", err, s.Data[networkkey.Key])
	}
	if rev, _ := revisions(ctx, cl, ns, defaultSpegel); rev != 1 {
		t.Errorf("revision %d after a rotation and a touch, want 1: the values must not depend on the key", rev)
	}

	// Deleted by hand: a new one, at once (the reconciler watches Secrets
	// its resources control).
	if err := cl.Delete(ctx, s); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a new network key", 30*time.Second, func() error {
		s, err := secret()
		if err != nil {
			return err
		}
		if k := string(s.Data[networkkey.Key]); !isKey(k) || k == rotated {
			return fmt.Errorf("key %q", k)
		}
		return nil
	})

	// A Secret the spec names must exist.
	updateSpegel(t, cl, ns, defaultSpegel, func(u *unstructured.Unstructured) {
		_ = unstructured.SetNestedField(u.Object, "corp-key", "spec", "networkKey", "secretName")
	})
	eventually(t, "a missing named Secret refused", 30*time.Second, func() error {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			return err
		}
		if st, _, m := condition(u, "Irreconcilable"); st != "True" || !strings.Contains(m, "spec.networkKey.secretName") {
			return fmt.Errorf("Irreconcilable=%s %q", st, m)
		}
		return nil
	})
	if err := cl.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "corp-key"}, Data: map[string][]byte{networkkey.Key: []byte(rotated)}}); err != nil {
		t.Fatal(err)
	}
	// Creating the Secret is no event of the resource: touch it.
	updateSpegel(t, cl, ns, defaultSpegel, func(u *unstructured.Unstructured) {
		u.SetAnnotations(map[string]string{"example.com/touch": "2"})
	})
	eventually(t, "the named Secret mounted", 30*time.Second, func() error {
		if err := cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds); err != nil {
			return err
		}
		if got := keyFile(t, ds); got != "corp-key" {
			return fmt.Errorf("mounted %q", got)
		}
		return nil
	})
	if err := cl.Delete(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "corp-key"}}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}
