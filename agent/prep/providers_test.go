package prep

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	"sigs.k8s.io/yaml"
)

// override is what a provider override (overrides/<name>.yaml) says about
// a node's containerd.
type override struct {
	prep     bool
	certsDir string
}

func readOverride(t *testing.T, name string) override {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "overrides", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Provider struct {
			Spegel struct {
				ContainerdPrep struct{ Enabled bool } `json:"containerdPrep"`
				Containerd     struct {
					CertsDir string `json:"certsDir"`
				} `json:"containerd"`
			} `json:"spegel"`
		} `json:"provider"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	o := override{prep: f.Provider.Spegel.ContainerdPrep.Enabled, certsDir: f.Provider.Spegel.Containerd.CertsDir}
	if o.certsDir == "" {
		o.certsDir = certsDir // the chart's default
	}
	return o
}

// mergeTOML lays over on base key by key, as nodeadm merges a NodeConfig's
// containerd.config over its template, and writes the result out.
func mergeTOML(t *testing.T, base, over []byte) []byte {
	t.Helper()
	var a, b map[string]any
	if err := toml.Unmarshal(base, &a); err != nil {
		t.Fatal(err)
	}
	if err := toml.Unmarshal(over, &b); err != nil {
		t.Fatal(err)
	}
	var merge func(a, b map[string]any)
	merge = func(a, b map[string]any) {
		for k, v := range b {
			am, aok := a[k].(map[string]any)
			bm, bok := v.(map[string]any)
			if aok && bok {
				merge(am, bm)
				continue
			}
			a[k] = v
		}
	}
	merge(a, b)
	out, err := toml.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestProviders runs each provider override's settings (certsDir, whether
// prep runs) on that provider's containerd config from testdata: a node
// where prep is off must already be ready (or be made ready by the user
// data the override documents), and where prep is on, prep must make it
// ready without refusing.
func TestProviders(t *testing.T) {
	for _, tc := range []struct {
		provider, fixture string
		userData          string // a NodeConfig snippet merged over the fixture first
		notReadyAlone     bool   // without userData the node is not ready
	}{
		{provider: "nebius", fixture: "containerd-1.7-default.toml"},
		{provider: "cks", fixture: "cks-documented.toml"},
		{provider: "eks", fixture: "eks-al2023-2.x.toml", userData: "eks-al2023-nodeconfig.toml", notReadyAlone: true},
		{provider: "gke", fixture: "gke-cos-1.7.toml"},
		{provider: "gke", fixture: "gke-ubuntu-1.7.toml"},
	} {
		t.Run(tc.provider+"/"+strings.TrimSuffix(tc.fixture, ".toml"), func(t *testing.T) {
			o := readOverride(t, tc.provider)
			src, err := os.ReadFile(filepath.Join("testdata", tc.fixture))
			if err != nil {
				t.Fatal(err)
			}
			opts := Options{CertsDir: o.certsDir}
			if tc.userData != "" {
				plan, err := Patch(src, opts)
				if tc.notReadyAlone && (err == nil && plan.Ready()) {
					t.Errorf("%s alone is ready; the override's user data would not be needed", tc.fixture)
				}
				t.Logf("without the user data: %v", err)
				snippet, err := os.ReadFile(filepath.Join("testdata", tc.userData))
				if err != nil {
					t.Fatal(err)
				}
				src = mergeTOML(t, src, snippet)
				assertDocumented(t, tc.provider, snippet)
			}
			path := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(path, src, 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := Config{Options: opts, Path: path, HostRoot: filepath.Dir(path), Unit: "containerd.service", RestartTimeout: time.Second}
			if !o.prep {
				plan, err := Check(cfg)
				if err != nil || !plan.Ready() {
					var s []string
					if plan != nil {
						for _, x := range plan.Settings {
							s = append(s, x.String())
						}
					}
					t.Fatalf("prep is off for %s, but the node is not ready: err=%v settings=%v", tc.provider, err, s)
				}
				return
			}
			r := &fakeRestarter{}
			plan, err := Run(context.Background(), cfg, r, quiet)
			if err != nil {
				t.Fatalf("prep refuses %s's config with the override's certsDir %s: %v", tc.provider, o.certsDir, err)
			}
			got, _ := os.ReadFile(path)
			var m map[string]any
			if err := toml.Unmarshal(got, &m); err != nil {
				t.Fatal(err)
			}
			cps, _ := targets(plan.Version)
			for _, c := range cps {
				if v := lookup(m, append(c.table, c.key)); !namesDir(v, o.certsDir, plan.Version) {
					t.Errorf("%v %s = %#v, want %s (where the agent writes hosts.toml)", c.table, c.key, v, o.certsDir)
				}
			}
			if p, err := Check(cfg); err != nil || !p.Ready() {
				t.Errorf("not ready after prep: %v", err)
			}
			t.Logf("prep changed=%v restarts=%d", plan.Changed, r.restarts)
		})
	}
}

// assertDocumented: every line of the user data snippet is in the
// override's comment, so what users copy is what was tested.
func assertDocumented(t *testing.T, provider string, snippet []byte) {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join("..", "..", "overrides", provider+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(snippet), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") && !strings.Contains(string(doc), "#         "+l) {
			t.Errorf("overrides/%s.yaml does not show the user data line %q", provider, l)
		}
	}
}
