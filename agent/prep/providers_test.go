package prep

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	"sigs.k8s.io/yaml"

	"github.com/fleetmirror/fleetmirror/agent/hosts"
)

// override is what a provider override (overrides/<name>.yaml) says about
// a node's containerd.
type override struct {
	prep            bool
	certsDir        string
	migrateMirrors  bool
	prependExisting bool
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
				ContainerdPrep struct {
					Enabled        bool
					MigrateMirrors bool `json:"migrateMirrors"`
				} `json:"containerdPrep"`
				Containerd struct {
					CertsDir string `json:"certsDir"`
				} `json:"containerd"`
				PrependExisting bool `json:"prependExisting"`
			} `json:"spegel"`
		} `json:"provider"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	sp := f.Provider.Spegel
	o := override{prep: sp.ContainerdPrep.Enabled, certsDir: sp.Containerd.CertsDir,
		migrateMirrors: sp.ContainerdPrep.MigrateMirrors, prependExisting: sp.PrependExisting}
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

// providerCase is one provider's containerd config and what the
// override's settings must make of it.
type providerCase struct {
	provider, fixture string
	userData          string // a NodeConfig snippet merged over the fixture first
	notReadyAlone     bool   // without userData the node is not ready
	// refused: prep, run with the override's settings, must refuse the
	// file with an error naming this (and leave it untouched).
	refused string
	// migrated: the hosts.toml files (relative to the certs dir) prep
	// writes for the file's inline mirrors, each listing these hosts in
	// this order; with the override's prependExisting, the agent's
	// hosts.toml must list them after its own.
	migrated map[string][]string
	// notReady: prep is off and the node is not ready; prep's check
	// must say so, naming this.
	notReady string
}

// providerCases: each provider's containerd configs in testdata, whose
// header comments name their source (or say they are stand-ins).
var providerCases = []providerCase{
	// Nebius publishes no node config; its stand-ins are containerd's own
	// default configs (1.7's hand-derived from 1.6's) and a minimal 2.x
	// file, since not even the version is documented.
	{provider: "nebius", fixture: "containerd-1.6-default.toml"},
	{provider: "nebius", fixture: "containerd-1.7-default.toml"},
	{provider: "nebius", fixture: "containerd-2.4-default.toml"},
	{provider: "nebius", fixture: "minimal-2.x.toml"},
	{provider: "cks", fixture: "cks-documented.toml"},
	// nodeadm's rendered template, with and without the override's user data.
	{provider: "eks", fixture: "eks-al2023-2.x.toml", userData: "eks-al2023-nodeconfig.toml", notReadyAlone: true},
	// Files nodeadm itself writes (its end-to-end expectations) for other
	// user data: neither is enough without the override's snippet.
	{provider: "eks", fixture: "eks-al2023-e2e-v3-expected.toml", notReady: "discard_unpacked_layers"},
	{provider: "eks", fixture: "eks-al2023-e2e-v2-expected.toml", notReady: "/etc/containerd/certs.d:/etc/docker/certs.d"},
	// GKE's own file: an inline docker.io mirror beside which containerd
	// takes no config_path; the override migrates it into hosts.d.
	{provider: "gke", fixture: "gke-cos-default.toml", migrated: gkeMirror},
	{provider: "gke", fixture: "gke-ubuntu-standin.toml", migrated: gkeMirror},
	// A GKE node whose config_path is GKE's hosts.d: prep keeps it.
	{provider: "gke", fixture: "gke-cos-hostsd.toml"},
}

// gkeMirror is GKE's Docker Hub mirror as containerd tried it: mirror.gcr.io,
// then registry-1.docker.io (the second endpoint), then the default host.
var gkeMirror = map[string][]string{"docker.io/hosts.toml": {"https://mirror.gcr.io", "https://registry-1.docker.io"}}

// TestProviders runs each provider override's settings (certsDir, whether
// prep runs) on that provider's containerd configs from testdata: a node
// where prep is off must already be ready (or be made ready by the user
// data the override documents, or be reported not ready for the stated
// reason), and where prep is on, prep must make it ready, or refuse it for
// the stated reason without touching it.
func TestProviders(t *testing.T) {
	for _, tc := range providerCases {
		name := tc.provider + "/" + strings.TrimSuffix(tc.fixture, ".toml")
		if tc.userData != "" {
			name += "+userdata"
		}
		t.Run(name, func(t *testing.T) { runProviderCase(t, tc) })
	}
}

func runProviderCase(t *testing.T, tc providerCase) {
	o := readOverride(t, tc.provider)
	src, err := os.ReadFile(filepath.Join("testdata", tc.fixture))
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{CertsDir: o.certsDir, MigrateMirrors: o.migrateMirrors}
	if o.migrateMirrors && !o.prependExisting {
		t.Errorf("overrides/%s.yaml migrates inline mirrors without prependExisting: the agent's hosts.toml would drop them", tc.provider)
	}
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
		if tc.refused != "" {
			t.Fatalf("case wants a refusal from prep, but overrides/%s.yaml turns prep off", tc.provider)
		}
		plan, err := Check(cfg)
		ready := err == nil && plan.Ready()
		var s []string
		if plan != nil {
			for _, x := range plan.Settings {
				s = append(s, x.String())
			}
		}
		if tc.notReady != "" {
			why := fmt.Sprint(err, s)
			if ready || !strings.Contains(why, tc.notReady) {
				t.Fatalf("want prep's check to find %s not ready over %q; ready=%v err=%v settings=%v", tc.fixture, tc.notReady, ready, err, s)
			}
			t.Logf("not ready, as expected: err=%v settings=%v", err, s)
			return
		}
		if !ready {
			t.Fatalf("prep is off for %s, but the node is not ready: err=%v settings=%v", tc.provider, err, s)
		}
		return
	}
	if tc.notReady != "" {
		t.Fatalf("case wants prep off, but overrides/%s.yaml turns prep on", tc.provider)
	}
	r := &fakeRestarter{}
	plan, err := Run(context.Background(), cfg, r, quiet)
	got, _ := os.ReadFile(path)
	if tc.refused != "" {
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.refused) {
			t.Fatalf("want prep to refuse %s over %q, got %v", tc.fixture, tc.refused, err)
		}
		if !bytes.Equal(got, src) || r.restarts != 0 {
			t.Errorf("a refused file was changed (%v) or containerd restarted (%d)", !bytes.Equal(got, src), r.restarts)
		}
		t.Logf("refused, as expected: %v", err)
		return
	}
	if err != nil {
		t.Fatalf("prep refuses %s's config with the override's certsDir %s: %v", tc.provider, o.certsDir, err)
	}
	var m map[string]any
	if err := toml.Unmarshal(got, &m); err != nil {
		t.Fatal(err)
	}
	cps, discard := targets(plan.Version)
	for _, c := range cps {
		if v := lookup(m, append(c.table, c.key)); !namesDir(v, o.certsDir, plan.Version) {
			t.Errorf("%v %s = %#v, want %s (where the agent writes hosts.toml)", c.table, c.key, v, o.certsDir)
		}
	}
	if v := lookup(m, append(discard.table, discard.key)); v != false {
		t.Errorf("%v %s = %#v, want false", discard.table, discard.key, v)
	}
	if p, err := Check(cfg); err != nil || !p.Ready() {
		t.Errorf("not ready after prep: %v", err)
	}
	if len(plan.Hosts) != len(tc.migrated) {
		t.Errorf("migrated %d inline mirrors, want %d", len(plan.Hosts), len(tc.migrated))
	}
	for file, want := range tc.migrated {
		assertMigrated(t, cfg, o, file, want)
	}
	t.Logf("prep changed=%v restarts=%d", plan.Changed, r.restarts)
}

// TestNodeadmMerge: mergeTOML, which TestProviders uses to lay the EKS
// override's user data over nodeadm's template, gives what nodeadm itself
// writes: nodeadm's own end-to-end case (user data and expected file,
// testdata/eks-al2023-e2e-v3-*) over the rendered template.
func TestNodeadmMerge(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var got, want map[string]any
	if err := toml.Unmarshal(mergeTOML(t, read("eks-al2023-2.x.toml"), read("eks-al2023-e2e-v3-nodeconfig.toml")), &got); err != nil {
		t.Fatal(err)
	}
	if err := toml.Unmarshal(read("eks-al2023-e2e-v3-expected.toml"), &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		g, _ := toml.Marshal(got)
		w, _ := toml.Marshal(want)
		t.Errorf("merged template differs from nodeadm's expected file:\n--- merged\n%s\n--- nodeadm\n%s", g, w)
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

// assertMigrated: the migrated hosts.toml lists want in order, and after
// the agent writes with the override's settings, its own host comes first
// and want follows.
func assertMigrated(t *testing.T, cfg Config, o override, file string, want []string) {
	t.Helper()
	certs := filepath.Join(cfg.HostRoot, o.certsDir)
	order := func() []string {
		b, err := os.ReadFile(filepath.Join(certs, file))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range hostHeader.FindAllStringSubmatch(string(b), -1) {
			got = append(got, m[1])
		}
		return got
	}
	if got := order(); !reflect.DeepEqual(got, want) {
		t.Errorf("%s hosts %v, want %v", file, got, want)
	}
	const agent = "http://127.0.0.1:30120"
	registry := "https://" + filepath.Dir(file)
	if err := hosts.Write(hosts.Config{CertsDir: certs, MirrorTargets: []string{agent}, Registries: []string{registry}, Prepend: o.prependExisting}); err != nil {
		t.Fatal(err)
	}
	if got := order(); !reflect.DeepEqual(got, append([]string{agent}, want...)) {
		t.Errorf("after the agent wrote %s (prependExisting %v): hosts %v, want the agent, then %v", file, o.prependExisting, got, want)
	}
}
