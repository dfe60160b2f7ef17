package operator

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"
)

// TestSpecIsTheChartsValues: the CRD (generated from the chart's
// values.schema.json) takes every value of the chart's values.yaml as a
// spec and keeps it as given, fills nothing into an empty spec (no CRD
// defaults: chart defaults < provider override < spec holds), and a
// misspelt field is refused under field validation Strict (kubectl's
// default) and warned about, then pruned, under Warn (client-go's).
func TestSpecIsTheChartsValues(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fm-crd"
	ensureNamespace(t, cl, ns)
	w := &warnings{}
	c := rest.CopyConfig(cfg)
	c.WarningHandler = w
	dyn, err := dynamic.NewForConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	res := dyn.Resource(schema.GroupVersionResource{Group: spegelGVK.Group, Version: spegelGVK.Version, Resource: "spegels"}).Namespace(ns)
	create := func(name string, spec map[string]any, validation string) (map[string]any, error) {
		t.Helper()
		u := spegel(ns, name, spec)
		got, err := res.Create(ctx, u, metav1.CreateOptions{FieldValidation: validation})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { _ = res.Delete(ctx, name, metav1.DeleteOptions{}) })
		s, _ := got.Object["spec"].(map[string]any)
		return s, nil
	}
	// JSON's numbers, as values.yaml reads.
	normal := func(v any) any {
		b, _ := json.Marshal(v)
		var out any
		_ = json.Unmarshal(b, &out)
		return out
	}

	// An empty spec stays empty.
	got, err := create("empty", map[string]any{}, "Strict")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 0 {
		t.Errorf("the API server filled an empty spec with %v: a CRD default beats the provider override", got)
	}

	// Every value of values.yaml, as a spec, is kept as it is.
	b, err := os.ReadFile(filepath.Join(repoRoot, "helm-charts", "spegel", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var all map[string]any
	if err := yaml.Unmarshal(b, &all); err != nil {
		t.Fatal(err)
	}
	got, err = create("all", all, "Strict")
	if err != nil {
		t.Fatalf("values.yaml as a spec refused: %v", err)
	}
	if !reflect.DeepEqual(normal(got), normal(all)) {
		gb, _ := json.Marshal(got)
		wb, _ := json.Marshal(all)
		t.Errorf("values.yaml as a spec came back changed (pruned or defaulted):\n got  %s\n want %s", gb, wb)
	}
	if m := w.take(); m != "" {
		t.Errorf("warnings for values.yaml as a spec: %v", m)
	}

	// The upgrade the operator chart's README gives: the generated CRD
	// applied server-side over the installed one, taking Helm's fields.
	crdFile, err := os.ReadFile(filepath.Join(repoRoot, "helm-charts", "operator", "crds", "charts.fleetmirror.dev_spegels.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var crdObj unstructured.Unstructured
	if err := yaml.Unmarshal(crdFile, &crdObj.Object); err != nil {
		t.Fatal(err)
	}
	if err := cl.Patch(ctx, &crdObj, client.Apply, client.FieldOwner("kubectl"), client.ForceOwnership, client.DryRunAll); err != nil {
		t.Errorf("kubectl apply --server-side --force-conflicts of the CRD: %v", err)
	}

	// A misspelt field: refused under Strict, naming it...
	typo := map[string]any{"mirrorResolveTimout": "50ms", "containerd": map[string]any{"sokcet": "/run/c.sock"}}
	_, err = create("typo", typo, "Strict")
	if !apierrors.IsBadRequest(err) || !strings.Contains(err.Error(), `unknown field "spec.mirrorResolveTimout"`) || !strings.Contains(err.Error(), `unknown field "spec.containerd.sokcet"`) {
		t.Errorf("a misspelt field under Strict: %v, want BadRequest naming spec.mirrorResolveTimout and spec.containerd.sokcet", err)
	}
	// ...and under Warn, kept out of the spec with a warning that names it.
	got, err = create("typo", typo, "Warn")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || len(got["containerd"].(map[string]any)) != 0 {
		t.Errorf("the misspelt fields were kept: %v", got)
	}
	if m := w.take(); !strings.Contains(m, `unknown field "spec.mirrorResolveTimout"`) {
		t.Errorf("warnings %q, want one naming spec.mirrorResolveTimout", m)
	}
}
