package operator

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
	"github.com/fleetmirror/fleetmirror/operator/networkkey"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// kubeVersion is the version of the kube-apiserver the tests run.
var kubeVersion = &chartutil.KubeVersion{Version: "v1.34.4", Major: "1", Minor: "34"}

var testImages = map[string]string{
	values.AgentImage:    "ghcr.io/fleetmirror/agent:v0.1.0",
	values.OperatorImage: "ghcr.io/fleetmirror/operator:v0.1.0",
}

// testKeySecret is the network key Secret the operator makes for a
// resource named spegel.
var testKeySecret = networkkey.SecretName("spegel")

// chartCase is one file of testdata/cases: a Spegel spec and, optionally,
// the imageMirror the operator is run with.
type chartCase struct {
	Name   string
	Mirror string         `json:"imageMirror"`
	Spec   map[string]any `json:"spec"`
}

func loadCases(t *testing.T) []chartCase {
	t.Helper()
	files, err := filepath.Glob("testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no cases in testdata/cases: %v", err)
	}
	var out []chartCase
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var c chartCase
		if err := yaml.Unmarshal(b, &c); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		c.Name = strings.TrimSuffix(filepath.Base(f), ".yaml")
		out = append(out, c)
	}
	return out
}

func loadChart(t *testing.T) *chart.Chart { return loadRepoChart(t, "spegel") }

// loadRepoChart loads helm-charts/<name> from the repository.
func loadRepoChart(t *testing.T, name string) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(filepath.Join(repoRoot, "helm-charts", name))
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// render returns the manifests of release "spegel" in namespace "spegel",
// hooks included, as the operator would install them.
func render(t *testing.T, ch *chart.Chart, c chartCase) string {
	t.Helper()
	vals, err := values.Translate(c.Spec, testKeySecret, values.Inputs{Images: testImages, Mirror: c.Mirror})
	if err != nil {
		t.Fatalf("%s: %v", c.Name, err)
	}
	inst := action.NewInstall(&action.Configuration{})
	inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "spegel", "spegel"
	inst.KubeVersion = kubeVersion
	rel, err := inst.Run(ch, vals)
	if err != nil {
		t.Fatalf("%s: rendering: %v", c.Name, err)
	}
	var b strings.Builder
	b.WriteString(rel.Manifest)
	sort.Slice(rel.Hooks, func(i, j int) bool { return rel.Hooks[i].Path+rel.Hooks[i].Name < rel.Hooks[j].Path+rel.Hooks[j].Name })
	for _, h := range rel.Hooks {
		b.WriteString("\n---\n# Hook: " + h.Path + "\n" + h.Manifest + "\n")
	}
	return b.String()
}

func TestChartGolden(t *testing.T) {
	ch := loadChart(t)
	for _, c := range loadCases(t) {
		t.Run(c.Name, func(t *testing.T) {
			got := render(t, ch, c)
			golden := filepath.Join("testdata", "golden", c.Name+".yaml")
			if *update {
				if err := os.MkdirAll(filepath.Dir(golden), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./test/operator -run TestChartGolden -update)", err)
			}
			if got != string(want) {
				t.Fatalf("rendered manifests differ from %s; if the change is intended, rerun with -update and review the diff.\n%s", golden, firstDiff(string(want), got))
			}
			checkImages(t, got)
		})
	}
}

// checkImages: only our two images, never a pause image or a legacy path.
func checkImages(t *testing.T, manifests string) {
	t.Helper()
	for _, line := range strings.Split(manifests, "\n") {
		l := strings.TrimSpace(line)
		if !strings.HasPrefix(l, "image:") {
			continue
		}
		img := strings.Trim(strings.TrimSpace(strings.TrimPrefix(l, "image:")), `"`)
		r, err := imageref.Parse(img)
		if err != nil {
			t.Errorf("image %q: %v", img, err)
			continue
		}
		if !strings.HasSuffix(r.Repository, "fleetmirror/agent") && !strings.HasSuffix(r.Repository, "fleetmirror/operator") || strings.Contains(img, "pause") || imageref.IsLegacy(r) {
			t.Errorf("image %q is not one of ours", img)
		}
	}
}

func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return "line " + strconv.Itoa(i+1) + ":\n  golden:   " + x + "\n  rendered: " + y
		}
	}
	return ""
}

func TestChartLint(t *testing.T) {
	dir := filepath.Join(repoRoot, "helm-charts", "spegel")
	for _, c := range loadCases(t) {
		vals, err := values.Translate(c.Spec, testKeySecret, values.Inputs{Images: testImages, Mirror: c.Mirror})
		if err != nil {
			t.Fatal(err)
		}
		res := lint.AllWithKubeVersionAndSchemaValidation(dir, vals, "spegel", kubeVersion, false)
		for _, m := range res.Messages {
			if m.Severity > support.InfoSev {
				t.Errorf("%s: helm lint: %s", c.Name, m)
			}
		}
	}
}

// TestChartValuesRefused: a wrong value fails at install with a message
// that names it.
func TestChartValuesRefused(t *testing.T) {
	ch := loadChart(t)
	for _, tc := range []struct {
		spec map[string]any
		want string
	}{
		{map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "lots"}}}, "/resources/limits/memory"},
		{map[string]any{"mirroredRegistries": []any{"docker.io"}}, "/mirroredRegistries/0"},
		{map[string]any{"logLevel": "loud"}, "logLevel"},
		{map[string]any{"hostNetwork": true, "service": map[string]any{"registry": map[string]any{"type": "NodePort"}}}, "NodePort needs hostNetwork: false"},
		{map[string]any{"containerdMirrorAdd": false, "prependExisting": true}, "prependExisting: true needs containerdMirrorAdd: true"},
		{map[string]any{"mirrorResolveTimout": "20ms"}, "mirrorResolveTimout"},
		{map[string]any{"debugWebAddr": "localhost"}, "debugWebAddr"},
		{map[string]any{"maxRequests": int64(0)}, "maxRequests"},
		{map[string]any{"privateRegistries": []any{"https://registry.corp"}}, "/privateRegistries/0"},
		{map[string]any{"upstreamTags": []any{"docker.io:latest"}}, "/upstreamTags/0"},
		{map[string]any{"networkKey": map[string]any{"secretName": "Not A Name"}}, "/networkKey/secretName"},
	} {
		vals, err := values.Translate(tc.spec, testKeySecret, values.Inputs{Images: testImages})
		if err != nil {
			t.Fatal(err)
		}
		inst := action.NewInstall(&action.Configuration{})
		inst.ClientOnly, inst.DryRun, inst.ReleaseName, inst.Namespace = true, true, "spegel", "spegel"
		inst.KubeVersion = kubeVersion
		_, err = inst.Run(ch, vals)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %v: error %v, want one naming %q", tc.spec, err, tc.want)
		}
	}
}

// TestChartServerDryRun: every rendered object of every case is accepted
// by a real kube-apiserver (server-side apply, dry run).
func TestChartServerDryRun(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "spegel"}}
	if err := cl.Create(ctx, ns); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	ch := loadChart(t)
	for _, c := range loadCases(t) {
		dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(render(t, ch, c)), 4096)
		n := 0
		for {
			var obj unstructured.Unstructured
			if err := dec.Decode(&obj.Object); err != nil {
				break
			}
			if len(obj.Object) == 0 {
				continue
			}
			n++
			err := cl.Patch(ctx, &obj, client.Apply, client.DryRunAll, client.FieldOwner("fleetmirror-test"), client.ForceOwnership)
			if meta.IsNoMatchError(err) && obj.GetKind() == "ServiceMonitor" {
				t.Logf("%s: ServiceMonitor not checked: the prometheus-operator CRD is not installed here", c.Name)
				continue
			}
			if err != nil {
				t.Errorf("%s: %s %s refused: %v", c.Name, obj.GetKind(), obj.GetName(), err)
			}
		}
		if n < 4 {
			t.Errorf("%s: only %d objects rendered", c.Name, n)
		}
	}
}

// TestChartDashboard: with dashboard.enabled the ConfigMap holds every
// dashboards/*.json as valid JSON (kept out of the golden files so editing
// a dashboard does not touch them); with no dashboards it renders nothing.
func TestChartDashboard(t *testing.T) {
	ch := loadChart(t)
	out := render(t, ch, chartCase{Name: "dashboard", Spec: map[string]any{"dashboard": map[string]any{"enabled": true}}})
	files, _ := filepath.Glob(filepath.Join(repoRoot, "helm-charts", "spegel", "dashboards", "*.json"))
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(out), 4096)
	var cm *unstructured.Unstructured
	for {
		var obj unstructured.Unstructured
		if err := dec.Decode(&obj.Object); err != nil {
			break
		}
		if obj.GetKind() == "ConfigMap" {
			cm = &obj
		}
	}
	if len(files) == 0 {
		if cm != nil {
			t.Fatal("a dashboards ConfigMap without dashboards")
		}
		return
	}
	if cm == nil {
		t.Fatalf("no dashboards ConfigMap for %d dashboards", len(files))
	}
	data, _, _ := unstructured.NestedStringMap(cm.Object, "data")
	for _, f := range files {
		s, ok := data[filepath.Base(f)]
		if !ok || !json.Valid([]byte(s)) {
			t.Errorf("%s: missing from the ConfigMap or not valid JSON there", filepath.Base(f))
		}
	}
	ch.Files = nil // the folder empty: nothing, and no error
	if out := render(t, ch, chartCase{Name: "no-dashboards", Spec: map[string]any{"dashboard": map[string]any{"enabled": true}}}); strings.Contains(out, "kind: ConfigMap") {
		t.Error("a ConfigMap rendered with no dashboards")
	}
}
