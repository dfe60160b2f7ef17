package values

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/strvals"
	"sigs.k8s.io/yaml"
)

const repoRoot = "../.."

// example is what each level sets one chart value to in
// TestPrecedenceEveryField: the provider override A, the spec B and
// watches.yaml's overrideValues C (`--set` text). Each differs from the
// others and from the chart's default, so the level that won is visible.
type example struct {
	A, B any
	C    string // empty: no overrideValues case (lists, maps, images)
	// With is laid under B in the spec, for a value that needs another
	// (image.tag needs image.repository).
	With map[string]any
}

// Distinct images the images map holds, so a value it filled is told apart
// from the chart's default.
var walkImages = map[string]string{AgentImage: "images.example/fm/agent:v7", OperatorImage: "images.example/fm/operator:v7"}

const walkKeySecret = "spegel-operator-network-key"

// filled are the values the operator fills when the spec leaves them out
// (the images map, the operator's network key Secret): what the "none"
// case finds instead of the chart's default. nil: the chart's default.
var filled = map[string]any{
	"image.repository":      "images.example/fm/agent",
	"image.tag":             "v7",
	"cleanup.waitImage":     "images.example/fm/operator:v7",
	"networkKey.secretName": walkKeySecret,
}

// examples: one per value of the chart. A new value fails the test until
// it has one here.
var examples = map[string]example{
	"image.repository":      {B: "registry.corp/fm/agent"},
	"image.tag":             {B: "v9", With: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent"}}},
	"image.pullPolicy":      {B: "Always", C: "Never"},
	"imagePullSecrets":      {A: []any{map[string]any{"name": "a"}}, B: []any{map[string]any{"name": "b"}}},
	"mirroredRegistries":    {A: []any{"https://a.example"}, B: []any{"https://b.example"}},
	"privateRegistries":     {A: []any{"a.example"}, B: []any{"b.example:5000"}},
	"localClients":          {A: []any{"10.0.0.1/32"}, B: []any{"10.0.0.2/32"}},
	"upstreamTags":          {A: []any{":a"}, B: []any{"docker.io/library/b"}},
	"networkKey.secretName": {A: "a-key", B: "b-key", C: "c-key"},
	"mirrorResolveTimeout":  {A: "30ms", B: "40ms", C: "1s"},
	"mirrorResolveRetries":  {A: 4, B: 5, C: "6"},
	"containerdMirrorAdd":   {A: false, B: true, C: "false"},
	"prependExisting":       {A: true, B: false, C: "true"},
	"mirrorTarget":          {A: "http://a.example:30120", B: "http://b.example:30120", C: "http://c.example:30120"},
	"logLevel":              {A: "warn", B: "debug", C: "error"},
	"debugWeb":              {A: false, B: true, C: "false"},
	"debugWebAddr":          {A: ":30123", B: "127.0.0.1:30024", C: "127.0.0.1:30025"},
	"maxRequests":           {A: 256, B: 1024, C: "2048"},
	"canaryInterval":        {A: "10m", B: "1m", C: "30s"},
	"canaryGatesReadiness":  {A: true, B: false, C: "true"},
	"releaseTaintAfter":     {A: "7m", B: "6m", C: "8m"},
	"containerd.socket":     {A: "/run/a.sock", B: "/run/b.sock", C: "/run/c.sock"},
	"containerd.namespace":  {A: "a", B: "b", C: "c"},
	"containerd.contentDir": {A: "/a/content", B: "/b/content", C: "/c/content"},
	"containerd.certsDir":   {A: "/etc/containerd/hosts.d", B: "/etc/b.d", C: "/etc/c.d"},
	"containerd.configPath": {A: "/etc/a.toml", B: "/etc/b.toml", C: "/etc/c.toml"},
	"hostNetwork":           {A: false, B: true, C: "false"},
	"ports.registry":        {A: 31020, B: 32020, C: "33020"},
	"ports.router":          {A: 31021, B: 32021, C: "33021"},
	"ports.metrics":         {A: 31022, B: 32022, C: "33022"},
	"clusterDomain":         {A: "a.local", B: "b.local", C: "c.local"},
	"dataDir":               {A: "/var/lib/a", B: "/var/lib/b", C: "/var/lib/c"},
	"service.registry.type": {A: "NodePort", B: "ClusterIP", C: "NodePort"},
	"resources.requests":    {A: map[string]any{"cpu": "20m"}, B: map[string]any{"cpu": "30m"}},
	"resources.limits":      {A: map[string]any{"memory": "300Mi"}, B: map[string]any{"memory": "400Mi"}},
	"nodeSelector":          {A: map[string]any{"pool": "a"}, B: map[string]any{"pool": "b"}},
	"tolerations":           {A: []any{map[string]any{"key": "a", "operator": "Exists"}}, B: []any{map[string]any{"key": "b", "operator": "Exists"}}},
	"affinity":              {A: map[string]any{"nodeAffinity": map[string]any{"a": "1"}}, B: map[string]any{"nodeAffinity": map[string]any{"a": "2"}}},
	"priorityClassName":     {A: "a", B: "b", C: "c"},
	"podAnnotations":        {A: map[string]any{"x": "a"}, B: map[string]any{"x": "b"}},
	"podLabels":             {A: map[string]any{"x": "a"}, B: map[string]any{"x": "b"}},
	"updateStrategy.type":   {A: "OnDelete", B: "RollingUpdate", C: "OnDelete"},
	"updateStrategy.rollingUpdate.maxUnavailable": {A: 2, B: "50%", C: "3"},
	"updateStrategy.rollingUpdate.maxSurge":       {A: 1, B: "10%", C: "2"},
	"containerdPrep.enabled":                      {A: true, B: false, C: "true"},
	"containerdPrep.image":                        {B: "registry.corp/fm/agent:v9"},
	"containerdPrep.unit":                         {A: "a.service", B: "b.service", C: "c.service"},
	"containerdPrep.migrateMirrors":               {A: true, B: false, C: "true"},
	"containerdPrep.resources.requests":           {A: map[string]any{"cpu": "6m"}, B: map[string]any{"cpu": "7m"}},
	"containerdPrep.resources.limits":             {A: map[string]any{"memory": "65Mi"}, B: map[string]any{"memory": "66Mi"}},
	"cleanup.enabled":                             {A: false, B: true, C: "false"},
	"cleanup.waitImage":                           {B: "registry.corp/fm/operator:v9"},
	"serviceMonitor.enabled":                      {A: true, B: false, C: "true"},
	"serviceMonitor.interval":                     {A: "10s", B: "20s", C: "40s"},
	"serviceMonitor.labels":                       {A: map[string]any{"x": "a"}, B: map[string]any{"x": "b"}},
	"networkPolicy.enabled":                       {A: true, B: false, C: "true"},
	"networkPolicy.metricsFrom":                   {A: []any{map[string]any{"podSelector": map[string]any{}}}, B: []any{map[string]any{"namespaceSelector": map[string]any{}}}},
	"dashboard.enabled":                           {A: true, B: false, C: "true"},
	"dashboard.labels":                            {A: map[string]any{"x": "a"}, B: map[string]any{"x": "b"}},
}

// TestPrecedenceEveryField is the documented precedence, checked for every
// value of the addon chart (every leaf of values.schema.json, which covers
// values.yaml) through Translate and Helm's own coalescing with the chart:
// chart default < provider override < spec < watches.yaml overrideValues,
// with the images map (and the operator's network key Secret) filling only
// what the spec leaves out; and the CRD carries each value, with no default
// that would hide the provider override.
func TestPrecedenceEveryField(t *testing.T) {
	ch, err := loader.Load(filepath.Join(repoRoot, "helm-charts", "spegel"))
	if err != nil {
		t.Fatal(err)
	}
	var schema map[string]any
	if err := json.Unmarshal(ch.Schema, &schema); err != nil {
		t.Fatal(err)
	}
	leaves := schemaLeaves(schema, schema, "")
	crdSpec := crdSpecSchema(t)

	// values.yaml holds nothing the schema's leaves do not cover.
	for _, p := range valueLeaves(ch.Values, "") {
		if !covered(leaves, p) {
			t.Errorf("values.yaml's %s is under no leaf of values.schema.json", p)
		}
	}
	seen := map[string]bool{}
	for _, p := range leaves {
		seen[p] = true
		ex, ok := examples[p]
		if !ok {
			t.Errorf("%s: no example in examples: add one (provider, spec, overrideValues)", p)
			continue
		}
		t.Run(p, func(t *testing.T) {
			path := strings.Split(p, ".")
			if s := lookupSchema(crdSpec, path); s == nil {
				t.Errorf("the CRD's spec has no %s: the API server would prune it", p)
			} else if b, _ := json.Marshal(s); strings.Contains(string(b), `"default":`) {
				t.Errorf("the CRD defaults spec.%s: the API server would write it into every spec, over the provider override", p)
			}

			def, hasDef := lookup(ch.Values, path)
			want := any(nil)
			if hasDef {
				want = def
			}
			if f, ok := filled[p]; ok {
				want = f
			}
			check(t, ch, "none", nil, nil, nil, path, want)

			image := isImage(path)
			if !image {
				check(t, ch, "provider", set(nil, path, ex.A), nil, nil, path, ex.A)
				if ex.C != "" {
					over := map[string]string{p: ex.C}
					c, err := strvals.Parse(p + "=" + ex.C)
					if err != nil {
						t.Fatal(err)
					}
					cv, _ := lookup(c, path)
					check(t, ch, "overrideValues over spec", set(nil, path, ex.A), set(ex.With, path, ex.B), over, path, cv)
				}
			} else if err := (Inputs{Images: walkImages, Defaults: set(nil, path, "x.example/a:v1")}).Validate(); err == nil {
				t.Errorf("a provider override naming %s is accepted: it would beat the images map", p)
			}
			var provider map[string]any
			if !image {
				provider = set(nil, path, ex.A)
			}
			check(t, ch, "spec over provider", provider, set(ex.With, path, ex.B), nil, path, ex.B)
		})
	}
	for p := range examples {
		if !seen[p] {
			t.Errorf("examples has %s, which values.schema.json does not", p)
		}
	}
}

// check renders the chart's final values (Translate, then Helm coalescing
// them with values.yaml and validating them against the chart's schema) and
// compares the value at path: whole for scalars and lists, key by key for
// maps (maps merge: the default's other keys stay).
func check(t *testing.T, ch *chart.Chart, name string, provider, spec map[string]any, over map[string]string, path []string, want any) {
	t.Helper()
	vals, err := Translate(spec, walkKeySecret, Inputs{Images: walkImages, Defaults: provider, Overrides: over})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	final, err := chartutil.CoalesceValues(ch, vals)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := chartutil.ValidateAgainstSchema(ch, final); err != nil {
		t.Fatalf("%s: the chart refuses the example: %v", name, err)
	}
	got, _ := lookup(final, path)
	if wm, ok := want.(map[string]any); ok {
		gm, _ := got.(map[string]any)
		for k, v := range wm {
			if !reflect.DeepEqual(normal(gm[k]), normal(v)) {
				t.Errorf("%s: %s.%s = %v, want %v", name, strings.Join(path, "."), k, gm[k], v)
			}
		}
		return
	}
	if !reflect.DeepEqual(normal(got), normal(want)) {
		t.Errorf("%s: %s = %#v, want %#v", name, strings.Join(path, "."), got, want)
	}
}

func isImage(path []string) bool {
	for _, p := range ImageValues {
		if len(path) >= len(p) && reflect.DeepEqual(path[:len(p)], p) {
			return true
		}
	}
	return false
}

// schemaLeaves lists the dotted paths of s's values: objects that name
// properties are walked into; anything else (scalars, lists, maps, free
// objects) is a leaf. Helm's own `global` is not a value of the chart.
func schemaLeaves(root, s map[string]any, prefix string) []string {
	s = deref(root, s)
	props, ok := s["properties"].(map[string]any)
	if !ok {
		return []string{prefix}
	}
	var out []string
	for k, v := range props {
		if prefix == "" && k == "global" {
			continue
		}
		m, _ := v.(map[string]any)
		out = append(out, schemaLeaves(root, m, join(prefix, k))...)
	}
	sort.Strings(out)
	return out
}

func deref(root, s map[string]any) map[string]any {
	if ref, ok := s["$ref"].(string); ok {
		defs, _ := root["definitions"].(map[string]any)
		d, _ := defs[strings.TrimPrefix(ref, "#/definitions/")].(map[string]any)
		return d
	}
	return s
}

// valueLeaves lists the dotted paths of values.yaml's non-map values and
// empty maps.
func valueLeaves(v map[string]any, prefix string) []string {
	var out []string
	for k, x := range v {
		if m, ok := x.(map[string]any); ok && len(m) > 0 {
			out = append(out, valueLeaves(m, join(prefix, k))...)
			continue
		}
		out = append(out, join(prefix, k))
	}
	return out
}

// covered: p is a leaf or lies under one (a map's key).
func covered(leaves []string, p string) bool {
	for _, l := range leaves {
		if p == l || strings.HasPrefix(p, l+".") {
			return true
		}
	}
	return false
}

func join(prefix, k string) string {
	if prefix == "" {
		return k
	}
	return prefix + "." + k
}

// crdSpecSchema is the checked-in CRD's spec schema.
func crdSpecSchema(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "crds", "charts.fleetmirror.dev_spegels.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var crd map[string]any
	if err := yaml.Unmarshal(b, &crd); err != nil {
		t.Fatal(err)
	}
	vs, _ := lookup(crd, []string{"spec", "versions"})
	v0, _ := vs.([]any)[0].(map[string]any)
	s, _ := lookup(v0, []string{"schema", "openAPIV3Schema", "properties", "spec"})
	return s.(map[string]any)
}

// lookupSchema walks a CRD schema's properties along path.
func lookupSchema(s map[string]any, path []string) map[string]any {
	for _, p := range path {
		props, _ := s["properties"].(map[string]any)
		next, ok := props[p].(map[string]any)
		if !ok {
			return nil
		}
		s = next
	}
	return s
}

func lookup(m map[string]any, path []string) (any, bool) {
	var cur any = m
	for _, p := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = mm[p]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// set returns a copy of base with v (as JSON reads it) at path.
func set(base map[string]any, path []string, v any) map[string]any {
	out := Merge(nil, base)
	cur := out
	for _, p := range path[:len(path)-1] {
		next, ok := cur[p].(map[string]any)
		if !ok {
			next = map[string]any{}
			cur[p] = next
		}
		cur = next
	}
	cur[path[len(path)-1]] = normal(v)
	return out
}

// normal is v as JSON reads it (numbers float64), so values from YAML,
// Go literals and `--set` compare alike.
func normal(v any) any {
	b, _ := json.Marshal(v)
	var out any
	_ = json.Unmarshal(b, &out)
	return out
}
