package prep

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/fleetmirror/fleetmirror/agent/hosts"
)

const (
	criReg    = `[plugins."io.containerd.grpc.v1.cri".registry`
	imagesReg = `[plugins."io.containerd.cri.v1.images".registry`
	pullOnly  = "capabilities = [\"pull\", \"resolve\"]\n"
)

// migrated is the hosts.toml prep writes for a mirrors table: its header,
// then the server (if any) and the hosts.
func migrated(table, server string, hosts ...string) string {
	s := hostsHeader + "# " + table + "\n"
	if server != "" {
		s += "server = \"" + server + "\"\n" + pullOnly
	}
	for _, h := range hosts {
		s += "\n[host.\"" + h + "\"]\n  " + pullOnly
	}
	return s
}

// migrateConfig writes config into a fresh host root and returns prep's
// Config for it, with the certs dir under that root.
func migrateConfig(t *testing.T, config string) Config {
	t.Helper()
	root := t.TempDir()
	var src []byte
	if name, ok := strings.CutPrefix(config, "@"); ok {
		var err error
		if src, err = os.ReadFile(filepath.Join("testdata", name)); err != nil {
			t.Fatal(err)
		}
	} else {
		src = []byte(config)
	}
	path := filepath.Join(root, "config.toml")
	if err := os.WriteFile(path, src, 0o640); err != nil {
		t.Fatal(err)
	}
	return Config{Options: Options{CertsDir: certsDir, MigrateMirrors: true}, Path: path, HostRoot: root,
		Unit: "containerd.service", RestartTimeout: time.Second}
}

// hostsFiles reads every file under the certs dir, by relative path.
func hostsFiles(t *testing.T, cfg Config) map[string]string {
	t.Helper()
	got := map[string]string{}
	dir := filepath.Join(cfg.HostRoot, cfg.CertsDir)
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(dir, p)
			got[rel] = string(b)
		}
		return nil
	})
	return got
}

// TestMigrateMirrors: each inline mirrors table becomes a hosts.toml whose
// hosts and server are the hosts containerd 1.x tried for it, in order;
// the config loses the tables and gains config_path; a second run changes
// nothing and restarts nothing.
func TestMigrateMirrors(t *testing.T) {
	gkeTable := criReg + `.mirrors."docker.io"]`
	cases := []struct {
		name, config string
		want         map[string]string // relative to the certs dir
	}{
		{name: "GKE default", config: "@gke-cos-default.toml", want: map[string]string{
			"docker.io/hosts.toml": migrated(gkeTable, "https://registry-1.docker.io", "https://mirror.gcr.io", "https://registry-1.docker.io"),
		}},
		{name: "wildcard is _default, no server", config: "version = 2\n" + criReg + ".mirrors.\"*\"]\n  endpoint = [\"https://m.example\"]\n",
			want: map[string]string{"_default/hosts.toml": migrated(criReg+`.mirrors."*"]`, "", "https://m.example")}},
		{name: "several registries", config: "version = 2\n" +
			criReg + ".mirrors.\"quay.io\"]\n  endpoint = [\"m.example:5000\", \"http://10.0.0.9:80\"]\n" +
			criReg + ".mirrors.\"localhost:5000\"]\n  endpoint = [\"127.0.0.1:5001\"]\n" +
			// ghcr.io itself listed first: containerd appended no fallback.
			criReg + ".mirrors.\"ghcr.io\"]\n  endpoint = [\"https://ghcr.io\", \"https://m.example\"]\n" +
			criReg + ".mirrors.\"empty.example\"]\n  endpoint = []\n" +
			criReg + ".mirrors.\"self.example\"]\n  endpoint = [\"self.example\"]\n" +
			// No endpoints for "*": every registry's default host, as
			// without a _default folder.
			criReg + ".mirrors.\"*\"]\n  endpoint = []\n",
			want: map[string]string{
				// A scheme-less endpoint is https, or http on loopback.
				"quay.io/hosts.toml":        migrated(criReg+`.mirrors."quay.io"]`, "https://quay.io", "https://m.example:5000", "http://10.0.0.9:80"),
				"localhost:5000/hosts.toml": migrated(criReg+`.mirrors."localhost:5000"]`, "http://localhost:5000", "http://127.0.0.1:5001"),
				"ghcr.io/hosts.toml":        migrated(criReg+`.mirrors."ghcr.io"]`, "https://m.example", "https://ghcr.io"),
				// No [host] entries fail pulls on older containerd
				// (containerd/containerd#10027): the server is one too.
				"empty.example/hosts.toml": migrated(criReg+`.mirrors."empty.example"]`, "https://empty.example", "https://empty.example"),
				"self.example/hosts.toml":  migrated(criReg+`.mirrors."self.example"]`, "https://self.example", "https://self.example"),
			}},
		{name: "dotted and inline keys", config: "version = 2\n" + criReg + "]\n  config_path = \"\"\n" +
			"  mirrors.\"docker.io\".endpoint = [\"https://mirror.gcr.io\"]\n  mirrors.\"k8s.io\" = { endpoint = [\"https://m.example\"] }\n",
			want: map[string]string{
				"docker.io/hosts.toml": migrated(criReg+`.mirrors."docker.io"]`, "https://registry-1.docker.io", "https://mirror.gcr.io"),
				"k8s.io/hosts.toml":    migrated(criReg+`.mirrors."k8s.io"]`, "https://k8s.io", "https://m.example"),
			}},
		{name: "version 3 images table", config: "version = 3\n" + imagesReg + ".mirrors.'docker.io']\n  endpoint = ['https://mirror.gcr.io']\n",
			want: map[string]string{"docker.io/hosts.toml": migrated(`[plugins."io.containerd.cri.v1.images".registry.mirrors."docker.io"]`, "https://registry-1.docker.io", "https://mirror.gcr.io")}},
		{name: "empty mirrors table stays as it is", config: "@containerd-1.6-default.toml", want: map[string]string{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := migrateConfig(t, tc.config)
			r := &fakeRestarter{}
			plan, err := Run(context.Background(), cfg, r, quiet)
			if err != nil {
				t.Fatal(err)
			}
			got := hostsFiles(t, cfg)
			if len(got) != len(tc.want) {
				t.Errorf("wrote %v, want %v", keys(got), keys(tc.want))
			}
			for p, w := range tc.want {
				if got[p] != w {
					t.Errorf("%s:\n%s\nwant:\n%s", p, got[p], w)
				}
			}
			b, _ := os.ReadFile(cfg.Path)
			var m map[string]any
			if err := toml.Unmarshal(b, &m); err != nil {
				t.Fatal(err)
			}
			for _, reg := range [][]string{{"plugins", criV1, "registry"}, {"plugins", criImages, "registry"}} {
				if v, ok := lookup(m, append(reg, "mirrors")).(map[string]any); ok && len(v) > 0 {
					t.Errorf("%v mirrors still there: %v", reg, v)
				}
			}
			assertSettings(t, b, plan.Version)
			if r.restarts != 1 {
				t.Errorf("%d restarts, want 1", r.restarts)
			}
			again, err := Run(context.Background(), cfg, r, quiet)
			if err != nil || again.Changed || r.restarts != 1 || len(again.Hosts) != 0 {
				t.Errorf("second run: err=%v changed=%v restarts=%d hosts=%d; want nothing to do", err, again.Changed, r.restarts, len(again.Hosts))
			}
			if after := hostsFiles(t, cfg); len(after) != len(got) {
				t.Errorf("second run changed the hosts files: %v -> %v", keys(got), keys(after))
			}
		})
	}
}

func keys(m map[string]string) []string {
	var k []string
	for p := range m {
		k = append(k, p)
	}
	sort.Strings(k)
	return k
}

// TestMigrateRefusals: what hosts.toml cannot say the same way is refused
// with the table named, and nothing is written or restarted.
func TestMigrateRefusals(t *testing.T) {
	mirror := func(name, body string) string {
		return "version = 2\n" + criReg + ".mirrors.\"" + name + "\"]\n" + body
	}
	cases := []struct {
		name, config string
		existing     map[string]string // relative to the certs dir
		noMigrate    bool
		want         string
	}{
		{name: "off by default", config: "@gke-cos-default.toml", noMigrate: true, want: "run prep with --migrate-mirrors"},
		{name: "rewrite", config: mirror("docker.io", "  endpoint = [\"https://m\"]\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\".rewrite]\n    \"^library/(.*)\" = \"lib/$1\"\n"),
			want: `registry.mirrors."docker.io"] has ` + "`rewrite`"},
		{name: "endpoint with a path", config: mirror("docker.io", "  endpoint = [\"https://m.example/v2/proxy\"]\n"), want: "has a path"},
		{name: "endpoint with a slash", config: mirror("docker.io", "  endpoint = [\"https://m.example/\"]\n"), want: "has a path"},
		{name: "endpoint with a query", config: mirror("docker.io", "  endpoint = [\"https://m.example?x=1\"]\n"), want: "has a query"},
		{name: "other scheme", config: mirror("docker.io", "  endpoint = [\"ftp://m.example\"]\n"), want: `scheme "ftp"`},
		{name: "unknown key", config: mirror("docker.io", "  endpoint = [\"https://m\"]\n  insecure = true\n"), want: `the key "insecure"`},
		{name: "endpoint not a list", config: mirror("docker.io", "  endpoint = \"https://m\"\n"), want: "not a list of URLs"},
		{name: "name with scheme", config: "version = 2\n" + criReg + ".mirrors.\"https://docker.io\"]\n  endpoint = [\"https://m\"]\n", want: "is not a registry host"},
		{name: "configs tls", config: "version = 2\n" + criReg + ".configs.\"m.example\".tls]\n  insecure_skip_verify = true\n",
			noMigrate: true, want: "`configs.tls` together with `config_path`"},
		{name: "configs tls beside mirrors", config: mirror("docker.io", "  endpoint = [\"https://m.example\"]\n") + criReg + ".configs.\"m.example\".tls]\n  ca_file = \"/ca.pem\"\n",
			want: "/etc/containerd/certs.d/m.example/hosts.toml as ca, client or skip_verify"},
		{name: "different hosts.toml there", config: "@gke-cos-default.toml",
			existing: map[string]string{"docker.io/hosts.toml": "server = \"https://registry-1.docker.io\"\n"},
			want:     "/etc/containerd/certs.d/docker.io/hosts.toml already exists with other content"},
		{name: "host_port_ folder there", config: mirror("10.0.0.1:5000", "  endpoint = [\"https://m.example\"]\n"),
			existing: map[string]string{"10.0.0.1_5000_/hosts.toml": "server = \"https://10.0.0.1:5000\"\n"},
			want:     "10.0.0.1_5000_/hosts.toml already exists"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := migrateConfig(t, tc.config)
			cfg.MigrateMirrors = !tc.noMigrate
			for p, c := range tc.existing {
				p = filepath.Join(cfg.HostRoot, cfg.CertsDir, p)
				os.MkdirAll(filepath.Dir(p), 0o755)
				os.WriteFile(p, []byte(c), 0o644)
			}
			orig, _ := os.ReadFile(cfg.Path)
			r := &fakeRestarter{}
			_, err := Run(context.Background(), cfg, r, quiet)
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v: want ErrRefused mentioning %q", err, tc.want)
			}
			if got, _ := os.ReadFile(cfg.Path); !bytes.Equal(got, orig) || r.restarts != 0 {
				t.Errorf("refused, yet the config changed (%v) or containerd restarted (%d)", !bytes.Equal(got, orig), r.restarts)
			}
			if got := hostsFiles(t, cfg); len(got) != len(tc.existing) {
				t.Errorf("refused, yet hosts files were written: %v", keys(got))
			}
			t.Log(err)
		})
	}
}

// TestMigrateWriteFails: when a hosts.toml cannot be written, the config
// stays as it was (its mirrors still in effect) and nothing restarts; a
// later run finds the files already written and finishes the job.
func TestMigrateWriteFails(t *testing.T) {
	cfg := migrateConfig(t, "version = 2\n"+
		criReg+".mirrors.\"a.example\"]\n  endpoint = [\"https://m.example\"]\n"+
		criReg+".mirrors.\"b.example\"]\n  endpoint = [\"https://m.example\"]\n")
	orig, _ := os.ReadFile(cfg.Path)
	writes := 0
	writeHostsFile = func(path string, data []byte, like os.FileInfo) error {
		if writes++; writes == 2 {
			return errors.New("disk full")
		}
		return writeAtomic(path, data, like)
	}
	t.Cleanup(func() { writeHostsFile = writeAtomic })
	r := &fakeRestarter{}
	if _, err := Run(context.Background(), cfg, r, quiet); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("err = %v, want the write's error", err)
	}
	if got, _ := os.ReadFile(cfg.Path); !bytes.Equal(got, orig) || r.restarts != 0 {
		t.Fatalf("a failed migration changed the config (%v) or restarted containerd (%d)", !bytes.Equal(got, orig), r.restarts)
	}
	writeHostsFile = writeAtomic
	plan, err := Run(context.Background(), cfg, r, quiet)
	if err != nil || r.restarts != 1 {
		t.Fatalf("retry: err=%v restarts=%d", err, r.restarts)
	}
	if len(plan.Hosts) != 2 || !plan.Hosts[0].Exists || plan.Hosts[1].Exists {
		t.Errorf("retry: hosts %+v; want a.example found written, b.example written now", plan.Hosts)
	}
	if got := hostsFiles(t, cfg); len(got) != 2 {
		t.Errorf("hosts files %v, want a.example and b.example", keys(got))
	}
}

var hostHeader = regexp.MustCompile(`(?m)^\[host\.["']([^"']+)["']\]`)

// TestMigrateBesideAgent: whether the agent (--prepend-existing) writes its
// docker.io hosts.toml before prep migrates GKE's mirror or after, once the
// agent has written again containerd tries the agent, then mirror.gcr.io,
// then Docker Hub; the agent's cleanup leaves the migrated file.
func TestMigrateBesideAgent(t *testing.T) {
	const agent = "http://127.0.0.1:30120"
	final := map[bool]string{}
	for _, agentFirst := range []bool{true, false} {
		cfg := migrateConfig(t, "@gke-cos-default.toml")
		hc := hosts.Config{CertsDir: filepath.Join(cfg.HostRoot, cfg.CertsDir), MirrorTargets: []string{agent},
			Registries: []string{"https://docker.io"}, Prepend: true}
		if agentFirst {
			if err := hosts.Write(hc); err != nil {
				t.Fatal(err)
			}
		}
		r := &fakeRestarter{}
		plan, err := Run(context.Background(), cfg, r, quiet)
		if err != nil {
			t.Fatalf("agent first=%v: %v", agentFirst, err)
		}
		if len(plan.Hosts) != 1 || plan.Hosts[0].AsBackup != agentFirst {
			t.Errorf("agent first=%v: hosts %+v", agentFirst, plan.Hosts)
		}
		if err := hosts.Write(hc); err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(hc.CertsDir, "docker.io", "hosts.toml")
		b, _ := os.ReadFile(file)
		var f struct {
			Server string
			Host   map[string]any
		}
		if err := toml.Unmarshal(b, &f); err != nil {
			t.Fatal(err)
		}
		var order []string
		for _, m := range hostHeader.FindAllStringSubmatch(string(b), -1) {
			order = append(order, m[1])
		}
		if f.Server != "https://registry-1.docker.io" || strings.Join(order, " ") != agent+" https://mirror.gcr.io https://registry-1.docker.io" {
			t.Errorf("agent first=%v: want the agent, mirror.gcr.io, registry-1.docker.io in that order, server registry-1.docker.io:\n%s", agentFirst, b)
		}
		// Only the agent's note whether it made the folder may differ.
		_, final[agentFirst], _ = strings.Cut(string(b), "\n")
		// Prep again: nothing to do, whatever the agent wrote since.
		if again, err := Run(context.Background(), cfg, r, quiet); err != nil || again.Changed || r.restarts != 1 {
			t.Errorf("agent first=%v: second prep err=%v changed=%v restarts=%d", agentFirst, err, again.Changed, r.restarts)
		}
		if err := hosts.Cleanup(hc.CertsDir); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(file); string(b) != migrated(criReg+`.mirrors."docker.io"]`, "https://registry-1.docker.io", "https://mirror.gcr.io", "https://registry-1.docker.io") {
			t.Errorf("agent first=%v: after the agent's cleanup docker.io/hosts.toml is\n%s\nwant the migrated file", agentFirst, b)
		}
	}
	if final[true] != final[false] {
		t.Errorf("the order of agent and prep matters:\n%s\n---\n%s", final[true], final[false])
	}
}
