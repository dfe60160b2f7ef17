package operator

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/storage/driver"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/fleetmirror/fleetmirror/operator/config"
	"github.com/fleetmirror/fleetmirror/operator/helmaction"
	"github.com/fleetmirror/fleetmirror/operator/imagecheck"
	"github.com/fleetmirror/fleetmirror/operator/imageref"
	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/readiness"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

const testMirror = "registry.corp:5000/mirror"

// overrideNames are the provider override files, "" for none.
var overrideNames = []string{"", "nebius", "cks", "eks", "gke"}

func loadOperatorChart(t *testing.T) *chart.Chart { return loadRepoChart(t, "operator") }

// operatorValues are the values `helm install -f overrides/<provider>.yaml
// --set imageMirror=<mirror>` gives, plus extra.
// defaultSpegel is the Spegel resource the operator chart creates
// (components.spegel.name), and so the addon release's name.
const defaultSpegel = "fleetmirror-spegel"

func operatorValues(t *testing.T, provider, mirror string, extra map[string]any) map[string]any {
	t.Helper()
	vals := map[string]any{}
	if provider != "" {
		v, err := chartutil.ReadValuesFile(filepath.Join(repoRoot, "overrides", provider+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		vals = v
	}
	if mirror != "" {
		vals["imageMirror"] = mirror
	}
	return values.Merge(vals, extra)
}

// renderOperator renders the operator chart as release "fleetmirror" in
// ns; it returns the manifests and the operator's configuration file.
func renderOperator(t *testing.T, ch *chart.Chart, ns string, vals map[string]any) (string, config.Config) {
	t.Helper()
	inst := action.NewInstall(&action.Configuration{})
	inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "fleetmirror", ns
	inst.KubeVersion = kubeVersion
	rel, err := inst.Run(ch, vals)
	if err != nil {
		t.Fatalf("rendering the operator chart: %v", err)
	}
	var cfgText string
	for _, o := range decodeAll(t, rel.Manifest) {
		if o.GetKind() == "ConfigMap" {
			cfgText, _, _ = unstructured.NestedString(o.Object, "data", "operator.yaml")
		}
	}
	p := filepath.Join(t.TempDir(), "operator.yaml")
	if err := os.WriteFile(p, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(p)
	if err != nil {
		t.Fatalf("the chart's ConfigMap does not load: %v\n%s", err, cfgText)
	}
	return rel.Manifest, c
}

func decodeAll(t *testing.T, manifests string) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifests), 4096)
	var out []*unstructured.Unstructured
	for {
		obj := &unstructured.Unstructured{}
		if err := dec.Decode(&obj.Object); err != nil {
			break
		}
		if len(obj.Object) > 0 {
			out = append(out, obj)
		}
	}
	return out
}

// inputs is what the operator configured by c hands to Translate.
func inputs(c config.Config) values.Inputs {
	return values.Inputs{Images: c.Images, Mirror: c.ImageMirror, Defaults: c.Provider.Spegel}
}

// addonSpec is the spec of the chart's Spegel resource, or every optional
// part of the addon chart turned on when the chart creates none.
func addonSpec(manifests string, t *testing.T) map[string]any {
	for _, o := range decodeAll(t, manifests) {
		if o.GetKind() == "Spegel" {
			spec, _, _ := unstructured.NestedMap(o.Object, "spec")
			return spec
		}
	}
	return map[string]any{"containerdPrep": map[string]any{"enabled": true}, "serviceMonitor": map[string]any{"enabled": true},
		"networkPolicy": map[string]any{"enabled": true}, "dashboard": map[string]any{"enabled": true}}
}

// TestOperatorChartCRDs: the chart ships the CRDs of crds/ byte for byte.
func TestOperatorChartCRDs(t *testing.T) {
	src, _ := filepath.Glob(filepath.Join(repoRoot, "crds", "*.yaml"))
	dst, _ := filepath.Glob(filepath.Join(repoRoot, "helm-charts", "operator", "crds", "*.yaml"))
	if len(src) == 0 || len(src) != len(dst) {
		t.Fatalf("crds/ has %d files, helm-charts/operator/crds/ %d: cp crds/*.yaml helm-charts/operator/crds/", len(src), len(dst))
	}
	for _, f := range src {
		a, _ := os.ReadFile(f)
		b, err := os.ReadFile(filepath.Join(repoRoot, "helm-charts", "operator", "crds", filepath.Base(f)))
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("helm-charts/operator/crds/%s differs from crds/ (%v): cp crds/*.yaml helm-charts/operator/crds/", filepath.Base(f), err)
		}
	}
	if n := len(loadOperatorChart(t).CRDObjects()); n != len(src) {
		t.Errorf("Helm sees %d CRDs in the chart, want %d", n, len(src))
	}
}

// TestOperatorChartLint: helm lint (schema included) is clean with every
// override, with and without imageMirror.
func TestOperatorChartLint(t *testing.T) {
	dir := filepath.Join(repoRoot, "helm-charts", "operator")
	for _, p := range overrideNames {
		for _, m := range []string{"", testMirror} {
			res := lint.AllWithKubeVersionAndSchemaValidation(dir, operatorValues(t, p, m, nil), "fleetmirror-system", kubeVersion, false)
			for _, msg := range res.Messages {
				if msg.Severity > support.InfoSev {
					t.Errorf("override %q mirror %q: helm lint: %s", p, m, msg)
				}
			}
		}
	}
}

// TestOperatorChartRefused: values the schema refuses, by name.
func TestOperatorChartRefused(t *testing.T) {
	ch := loadOperatorChart(t)
	for _, tc := range []struct {
		vals map[string]any
		want string
	}{
		{map[string]any{"images": map[string]any{"agent": "fleetmirror/agent:v1"}}, "/images/agent"},
		{map[string]any{"images": map[string]any{"agent": "k8s.gcr" + ".io/pause:3.9"}}, "images.agent: k8s.gcr" + ".io/pause:3.9 is on a legacy registry that was shut down; use registry.k8s.io/pause:3.9"},
		{map[string]any{"imageMirror": "https://registry.corp"}, "imageMirror"},
		{map[string]any{"provider": map[string]any{"spegel": map[string]any{"image": map[string]any{"repository": "x.io/a"}}}}, "provider.spegel"},
		{map[string]any{"provider": map[string]any{"spegel": map[string]any{"containerdPrep": map[string]any{"image": "x.io/a:v1"}}}}, "provider.spegel.containerdPrep.image"},
		{map[string]any{"provider": map[string]any{"spegel": map[string]any{"cleanup": map[string]any{"waitImage": "x.io/a:v1"}}}}, "provider.spegel.cleanup.waitImage"},
		{map[string]any{"nodeReadiness": map[string]any{"enabled": "yes"}}, "/nodeReadiness/enabled"},
		{map[string]any{"imageMirorr": "x.io"}, "imageMirorr"},
	} {
		inst := action.NewInstall(&action.Configuration{})
		inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "fleetmirror", "fleetmirror-system"
		inst.KubeVersion = kubeVersion
		_, err := inst.Run(ch, tc.vals)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %v: error %v, want one naming %q", tc.vals, err, tc.want)
		}
	}
}

// TestOperatorImageTemplate: the chart places the operator's own image
// under imageMirror exactly where imageref.Mirror (the operator and the
// mirror-images pipeline) does.
func TestOperatorImageTemplate(t *testing.T) {
	ch := loadOperatorChart(t)
	d := "@sha256:" + strings.Repeat("ab", 32)
	refs := []string{
		"ghcr.io/fleetmirror/operator:0.1.0", "ghcr.io/fleetmirror/operator:0.1.0" + d, "ghcr.io/fleetmirror/operator" + d,
		"docker.io/library/busybox:1.36", "registry.k8s.io/pause:3.10", "127.0.0.1:5000/team/operator:v1", "localhost:5000/operator:v1",
		"localhost/operator:v1", "quay.io/a/b/c/d:v1", "registry.corp:5000/mirror/ghcr.io/fleetmirror/operator:v1", "registry.corp/op__x:v1",
	}
	mirrors := []string{"", "registry.corp:5000/mirror", "registry.corp:5000/mirror/", "mirror.io", "localhost:5000", "m.io/a/b//"}
	for _, ref := range refs {
		for _, m := range mirrors {
			manifests, _ := renderOperator(t, ch, "fleetmirror-system", map[string]any{"images": map[string]any{"operator": ref}, "imageMirror": m})
			imgs, err := imagecheck.Images(manifests)
			if err != nil || len(imgs) != 1 {
				t.Fatalf("images %v %v", imgs, err)
			}
			want := ref
			if m != "" {
				if want, err = imageref.Mirror(m, ref); err != nil {
					t.Fatal(err)
				}
			}
			if imgs[0].Ref != want {
				t.Errorf("operator image %s under mirror %q: chart renders %s, imageref.Mirror %s", ref, m, imgs[0].Ref, want)
			}
		}
	}
}

// applyAll applies every object of manifests to the API server (server-side
// apply), as a dry run when dryRun is set.
func applyAll(t *testing.T, cl client.Client, manifests string, dryRun bool) int {
	t.Helper()
	ctx := context.Background()
	n := 0
	for _, obj := range decodeAll(t, manifests) {
		opts := []client.PatchOption{client.FieldOwner("fleetmirror-test"), client.ForceOwnership}
		if dryRun {
			opts = append(opts, client.DryRunAll)
		}
		err := cl.Patch(ctx, obj, client.Apply, opts...)
		if meta.IsNoMatchError(err) && obj.GetKind() == "ServiceMonitor" {
			continue // the prometheus-operator CRD is not installed here
		}
		if err != nil {
			t.Errorf("%s %s/%s refused: %v", obj.GetKind(), obj.GetNamespace(), obj.GetName(), err)
		}
		n++
	}
	return n
}

func ensureNamespace(t *testing.T, cl client.Client, name string) {
	t.Helper()
	err := cl.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// TestOperatorChartServerDryRun: with every override, with and without
// imageMirror, the real kube-apiserver accepts every object of the
// operator chart and of the addon chart the operator then renders (hooks
// included); with imageMirror no image of either escapes the mirror, and a
// planted unmirrored image is caught.
func TestOperatorChartServerDryRun(t *testing.T) {
	needCluster(t)
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ensureNamespace(t, cl, "fleetmirror-system")
	ch, addon := loadOperatorChart(t), loadChart(t)
	for _, p := range overrideNames {
		for _, m := range []string{"", testMirror} {
			name := fmt.Sprintf("override=%q mirror=%q", p, m)
			manifests, c := renderOperator(t, ch, "fleetmirror-system", operatorValues(t, p, m, map[string]any{"nodeReadiness": map[string]any{"enabled": true}}))
			if c.Provider.Name != p || c.ImageMirror != m {
				t.Errorf("%s: config says provider %q mirror %q", name, c.Provider.Name, c.ImageMirror)
			}
			ns := "fleetmirror-system"
			for _, o := range decodeAll(t, manifests) {
				if o.GetKind() == "Spegel" {
					ns = o.GetNamespace()
				}
			}
			ensureNamespace(t, cl, ns)
			for _, o := range decodeAll(t, manifests) {
				rules, _, _ := unstructured.NestedSlice(o.Object, "rules")
				if strings.Contains(fmt.Sprint(rules), "*") {
					t.Errorf("%s: %s %s has a wildcard: %v", name, o.GetKind(), o.GetName(), rules)
				}
			}
			if n := applyAll(t, cl, manifests, true); n < 7 {
				t.Errorf("%s: only %d objects in the operator chart", name, n)
			}
			// What the operator configured by this chart renders.
			vals, err := values.Translate(addonSpec(manifests, t), testKeySecret, inputs(c))
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			addonOut := renderAddon(t, addon, ns, vals)
			applyAll(t, cl, addonOut, true)
			all := manifests + "\n---\n" + addonOut
			if m == "" {
				continue
			}
			bad, err := imagecheck.Escapes(m, all)
			if err != nil {
				t.Fatal(err)
			}
			if len(bad) > 0 {
				t.Errorf("%s: images escape the mirror:\n%s", name, strings.Join(bad, "\n"))
			}
			imgs, _ := imagecheck.Images(all)
			if len(imgs) < 5 { // operator, agent, cleanup (2), wait hook
				t.Errorf("%s: only %d images checked: %v", name, len(imgs), imgs)
			}
			planted := all + "\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: planted, namespace: x}\nspec:\n  containers:\n    - name: c\n      image: busybox:1.36\n"
			if bad, _ := imagecheck.Escapes(m, planted); len(bad) != 1 || !strings.Contains(bad[0], "Pod x/planted") {
				t.Errorf("%s: the planted unmirrored image was not caught: %v", name, bad)
			}
		}
	}
}

// renderAddon renders helm-charts/spegel as the operator would, hooks included.
func renderAddon(t *testing.T, ch *chart.Chart, ns string, vals map[string]any) string {
	t.Helper()
	inst := action.NewInstall(&action.Configuration{})
	inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "spegel", ns
	inst.KubeVersion = kubeVersion
	rel, err := inst.Run(ch, vals)
	if err != nil {
		t.Fatalf("rendering the addon chart: %v", err)
	}
	var b strings.Builder
	b.WriteString(rel.Manifest)
	for _, h := range rel.Hooks {
		b.WriteString("\n---\n" + h.Manifest + "\n")
	}
	return b.String()
}

// operatorRun is the operator as its chart configures it, running in this
// process against the real kube-apiserver as the chart's ServiceAccount, so
// the chart's RBAC is what it gets.
type operatorRun struct {
	cancel context.CancelFunc
	done   chan error
}

func startOperator(t *testing.T, manifests string, c config.Config, reportAfter time.Duration, tweaks ...func(*manager.Options)) *operatorRun {
	t.Helper()
	var sa, ns string
	for _, o := range decodeAll(t, manifests) {
		switch o.GetKind() {
		case "ServiceAccount":
			sa, ns = o.GetName(), o.GetNamespace()
		case "Deployment":
			args, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
			if !strings.Contains(fmt.Sprint(args), "--config=/etc/fleetmirror/operator.yaml") || !strings.Contains(fmt.Sprint(args), "mountPath:/etc/fleetmirror") {
				t.Fatalf("the Deployment does not read its ConfigMap at /etc/fleetmirror/operator.yaml: %v", args)
			}
		}
	}
	as := rest.CopyConfig(cfg)
	as.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":" + sa}
	if reportAfter == 0 {
		reportAfter = c.ReportAfter()
	}
	o := manager.Options{
		WatchesFile:             filepath.Join(repoRoot, "watches.yaml"),
		Inputs:                  inputs(c),
		Provider:                c.Provider.Name,
		NodeReadiness:           c.NodeReadiness.Enabled,
		ReportAfter:             reportAfter,
		ReleaseAfter:            c.ReleaseAfter(),
		NodeConditions:          c.NodeConditions,
		ManagedNamespaces:       c.ManagedNamespaces,
		Timeouts:                helmaction.Timeouts{Install: time.Minute, Upgrade: time.Minute, Uninstall: time.Minute},
		MetricsAddr:             "0",
		ProbeAddr:               "0",
		LeaderElection:          true,
		LeaderElectionNamespace: ns,
		SkipNameValidation:      true,
		Log:                     slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	}
	for _, tw := range tweaks {
		tw(&o)
	}
	mgr, err := manager.New(as, o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &operatorRun{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- mgr.Start(ctx) }()
	return r
}

func (r *operatorRun) stop(t *testing.T) {
	r.cancel()
	if err := <-r.done; err != nil {
		t.Errorf("operator: %v", err)
	}
}

// forget deletes a Spegel resource with the operator stopped, dropping its
// finalizer (the uninstall path is TestOperator's), so the next test may
// create the cluster's one resource.
func forget(t *testing.T, cl client.Client, ns, name string) {
	t.Helper()
	if !updateSpegel(t, cl, ns, name, func(u *unstructured.Unstructured) { u.SetFinalizers(nil) }) {
		return
	}
	if err := cl.Delete(context.Background(), spegel(ns, name, nil)); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}

// updateSpegel changes a Spegel resource, reading it again when the operator
// wrote it in between; it reports false when there is no such resource.
func updateSpegel(t *testing.T, cl client.Client, ns, name string, mutate func(*unstructured.Unstructured)) bool {
	t.Helper()
	found := true
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		u := spegel(ns, name, nil)
		if err := cl.Get(context.Background(), client.ObjectKeyFromObject(u), u); err != nil {
			if apierrors.IsNotFound(err) {
				found = false
				return nil
			}
			return err
		}
		mutate(u)
		return cl.Update(context.Background(), u)
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// TestOperatorInstall: `helm install -f overrides/nebius.yaml --set
// imageMirror=...` with the operator running creates the Spegel resource
// and DaemonSets whose every image, hooks included, is under the mirror;
// with overrides/cks.yaml the agent has 128Mi/256Mi and there is no prep
// DaemonSet. The operator runs with only the chart's RBAC.
func TestOperatorInstall(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	ch := loadOperatorChart(t)

	t.Run("nebius+imageMirror", func(t *testing.T) {
		const ns = "fm-nebius"
		ensureNamespace(t, cl, ns)
		manifests, c := renderOperator(t, ch, ns, operatorValues(t, "nebius", testMirror, map[string]any{
			"components": map[string]any{"spegel": map[string]any{"mirroredRegistries": []any{"https://docker.io", "https://ghcr.io"}}},
		}))
		applyAll(t, cl, manifests, false)
		defer forget(t, cl, ns, defaultSpegel)
		op := startOperator(t, manifests, c, 0)
		defer op.stop(t)

		var dss []appsv1.DaemonSet
		eventually(t, "the agent and prep DaemonSets", time.Minute, func() error {
			var l appsv1.DaemonSetList
			if err := cl.List(ctx, &l, client.InNamespace(ns)); err != nil {
				return err
			}
			if len(l.Items) != 2 {
				return fmt.Errorf("%d DaemonSets", len(l.Items))
			}
			dss = l.Items
			return nil
		})
		var all strings.Builder
		for _, ds := range dss {
			ds.APIVersion, ds.Kind = "apps/v1", "DaemonSet"
			b, _ := yaml.Marshal(ds)
			all.WriteString(string(b) + "\n---\n")
			if ds.Name == defaultSpegel && agentEnv(&ds, "FLEETMIRROR_MIRRORED_REGISTRIES") != "https://docker.io,https://ghcr.io" {
				t.Errorf("mirroredRegistries from components.spegel: %q", agentEnv(&ds, "FLEETMIRROR_MIRRORED_REGISTRIES"))
			}
		}
		// The hooks are in the release record until an uninstall runs them.
		rels, err := driver.NewSecrets(cs.CoreV1().Secrets(ns)).Query(map[string]string{"name": defaultSpegel, "owner": "helm"})
		if err != nil || len(rels) == 0 {
			t.Fatalf("reading the release: %v", err)
		}
		hooks := 0
		for _, h := range rels[0].Hooks {
			all.WriteString(h.Manifest + "\n---\n")
			hooks++
		}
		imgs, _ := imagecheck.Images(all.String())
		bad, err := imagecheck.Escapes(testMirror, all.String())
		if err != nil {
			t.Fatal(err)
		}
		if len(bad) > 0 || hooks < 4 || len(imgs) < 6 {
			t.Errorf("%d images in the DaemonSets and %d hooks; escaping the mirror:\n%s", len(imgs), hooks, strings.Join(bad, "\n"))
		}
		eventually(t, "the provider override recorded", 30*time.Second, func() error {
			u := spegel(ns, defaultSpegel, nil)
			if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
				return err
			}
			if s, _, m := condition(u, "ProviderOverride"); s != "True" || !strings.Contains(m, `"nebius"`) {
				return fmt.Errorf("ProviderOverride=%s %q", s, m)
			}
			return nil
		})
		t.Logf("FIGURES nebius+imageMirror: %d images (%d hook objects) all under %s", len(imgs), hooks, testMirror)
	})

	t.Run("cks", func(t *testing.T) {
		const ns = "fm-cks"
		ensureNamespace(t, cl, ns)
		manifests, c := renderOperator(t, ch, ns, operatorValues(t, "cks", "", nil))
		applyAll(t, cl, manifests, false)
		defer forget(t, cl, ns, defaultSpegel)
		op := startOperator(t, manifests, c, 0)
		defer op.stop(t)
		ds := &appsv1.DaemonSet{}
		eventually(t, "the agent DaemonSet", time.Minute, func() error {
			return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds)
		})
		eventually(t, "Deployed", 30*time.Second, func() error {
			u := spegel(ns, defaultSpegel, nil)
			if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
				return err
			}
			if s, _, m := condition(u, "Deployed"); s != "True" {
				return fmt.Errorf("Deployed=%s %s", s, m)
			}
			return nil
		})
		res := ds.Spec.Template.Spec.Containers[0].Resources
		if res.Requests.Memory().String() != "128Mi" || res.Limits.Memory().String() != "256Mi" {
			t.Errorf("agent memory request %s limit %s, want 128Mi/256Mi", res.Requests.Memory(), res.Limits.Memory())
		}
		lock := corev1.Taint{Key: "sunk.coreweave.com/lock", Effect: corev1.TaintEffectNoExecute}
		tolerated := false
		for _, tol := range ds.Spec.Template.Spec.Tolerations {
			tolerated = tolerated || tol.ToleratesTaint(logr.Discard(), &lock, false)
		}
		if !tolerated {
			t.Errorf("the agent does not tolerate %s:NoExecute: %v", lock.Key, ds.Spec.Template.Spec.Tolerations)
		}
		var l appsv1.DaemonSetList
		if err := cl.List(ctx, &l, client.InNamespace(ns)); err != nil {
			t.Fatal(err)
		}
		for _, d := range l.Items {
			if d.Name != defaultSpegel {
				t.Errorf("DaemonSet %s besides the agent: CKS nodes come prepared", d.Name)
			}
		}
	})
}

// TestPrecedenceOnCluster: a resource's spec beats the provider override,
// which beats the chart default; the images map fills only what the spec
// leaves out. Checked on the objects the operator creates.
func TestPrecedenceOnCluster(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fm-precedence"
	ensureNamespace(t, cl, ns)
	// cks sets 128Mi/256Mi and prep off; the chart default logLevel is info.
	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", testMirror, map[string]any{
		"components": map[string]any{"spegel": map[string]any{
			"resources":      map[string]any{"limits": map[string]any{"memory": "300Mi"}},
			"containerdPrep": map[string]any{"enabled": true},
			"image":          map[string]any{"repository": "quay.io/team/agent", "tag": "v9"},
		}},
	}))
	applyAll(t, cl, manifests, false)
	defer forget(t, cl, ns, defaultSpegel)
	op := startOperator(t, manifests, c, 0)
	defer op.stop(t)
	ds, prep := &appsv1.DaemonSet{}, &appsv1.DaemonSet{}
	eventually(t, "agent and prep DaemonSets", time.Minute, func() error {
		if err := cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel}, ds); err != nil {
			return err
		}
		return cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: defaultSpegel + "-containerd-prep"}, prep)
	})
	ag := ds.Spec.Template.Spec.Containers[0]
	if got := ag.Resources.Limits.Memory().String(); got != "300Mi" {
		t.Errorf("memory limit %s: the spec's 300Mi must beat the override's 256Mi", got)
	}
	if got := ag.Resources.Requests.Memory().String(); got != "128Mi" {
		t.Errorf("memory request %s: the override's 128Mi fills what the spec leaves out", got)
	}
	if got := agentEnv(ds, "FLEETMIRROR_LOG_LEVEL"); got != "info" {
		t.Errorf("logLevel %q: the chart default", got)
	}
	if want := testMirror + "/quay.io/team/agent:v9"; ag.Image != want {
		t.Errorf("agent image %s, want the spec's image under the mirror: %s", ag.Image, want)
	}
	var hookImgs []string
	rels, err := driver.NewSecrets(kubernetes.NewForConfigOrDie(cfg).CoreV1().Secrets(ns)).Query(map[string]string{"name": defaultSpegel, "owner": "helm"})
	if err != nil || len(rels) == 0 {
		t.Fatalf("reading the release: %v", err)
	}
	for _, h := range rels[0].Hooks {
		imgs, _ := imagecheck.Images(h.Manifest)
		for _, i := range imgs {
			hookImgs = append(hookImgs, i.Ref)
		}
	}
	sort.Strings(hookImgs)
	if want := testMirror + "/ghcr.io/fleetmirror/operator:"; len(hookImgs) == 0 || !strings.HasPrefix(hookImgs[0], want) {
		t.Errorf("hook images %v: the wait hook's operator image comes from the images map, under the mirror (%s...)", hookImgs, want)
	}
}

// startupTaint is what a node pool registering with the taint carries.
var startupTaint = corev1.Taint{Key: readiness.TaintKey, Effect: corev1.TaintEffectNoSchedule}
