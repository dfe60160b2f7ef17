package hosts

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/log"
	"github.com/pelletier/go-toml/v2/unstable"
	"github.com/sirupsen/logrus"
)

// These tests feed our files to containerd's own hosts.toml reader, so the
// output is shown to mean what we intend to containerd, not just to us.

const (
	capsMirror = docker.HostCapabilityPull | docker.HostCapabilityResolve
	capsAll    = docker.HostCapabilityPull | docker.HostCapabilityResolve | docker.HostCapabilityPush | docker.HostCapabilityReferrers
)

// quietCtx silences containerd's "failed to decode" log lines, which the
// fuzzer would otherwise print by the thousand.
func quietCtx() context.Context {
	l := logrus.New()
	l.Out = io.Discard
	return log.WithLogger(context.Background(), logrus.NewEntry(l))
}

// containerdHosts is what containerd would try, in order, for a pull from host.
func containerdHosts(root, host string) ([]docker.RegistryHost, error) {
	return config.ConfigureHosts(quietCtx(), config.HostOptions{HostDir: config.HostDirFromRoot(root)})(host)
}

type hostView struct {
	Scheme, Host, Path string
	Caps               docker.HostCapabilities
	Header             http.Header
}

func views(hs []docker.RegistryHost) []hostView {
	var out []hostView
	for _, h := range hs {
		out = append(out, hostView{h.Scheme, h.Host, h.Path, h.Capabilities, h.Header})
	}
	return out
}

func TestContainerdReadsOurFiles(t *testing.T) {
	mirror := hostView{"http", "127.0.0.1:30120", "/v2", capsMirror, nil}
	mirror2 := hostView{"https", "10.0.0.7:30121", "/v2", capsMirror, nil}
	tests := []struct {
		name     string
		cfg      Config
		existing map[string]string // relative path -> content, written first
		pull     string            // registry host as in an image reference
		want     []hostView
	}{
		{
			name: "single registry",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io"}},
			pull: "ghcr.io",
			want: []hostView{mirror, {"https", "ghcr.io", "/v2", capsAll, nil}},
		},
		{
			name: "docker.io goes upstream to registry-1",
			cfg:  Config{MirrorTargets: []string{local, "https://10.0.0.7:30121"}, Registries: []string{"https://docker.io", "https://ghcr.io"}},
			pull: "docker.io",
			want: []hostView{mirror, mirror2, {"https", "registry-1.docker.io", "/v2", capsAll, nil}},
		},
		{
			name: "registry with port over http",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"http://10.1.2.3:5000"}},
			pull: "10.1.2.3:5000",
			want: []hostView{mirror, {"http", "10.1.2.3:5000", "/v2", capsAll, nil}},
		},
		{
			name: "_default covers any registry",
			cfg:  Config{MirrorTargets: []string{local}},
			pull: "quay.io",
			want: []hostView{mirror, {"https", "quay.io", "/v2", capsAll, nil}},
		},
		{
			name: "unlisted registry is untouched",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io"}},
			pull: "quay.io",
			want: []hostView{{"https", "quay.io", "/v2", capsAll, nil}},
		},
		{
			name: "prepend keeps user's hosts in order, then user's server",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io"}, Prepend: true},
			existing: map[string]string{"ghcr.io/hosts.toml": `server = "https://proxy.corp.example"
capabilities = ["pull", "resolve"]
[host."https://c.example"]
  capabilities = ["pull"]
[host."https://b.example/sub"]
  override_path = true
[host."https://a.example"]
  [host."https://a.example".header]
    x-a = ["1", "2"]
`},
			pull: "ghcr.io",
			want: []hostView{
				mirror,
				{"https", "c.example", "/v2", docker.HostCapabilityPull, nil},
				{"https", "b.example", "/sub", capsAll, nil},
				{"https", "a.example", "/v2", capsAll, http.Header{"x-a": {"1", "2"}}},
				{"https", "proxy.corp.example", "/v2", capsMirror, nil},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for p, c := range tt.existing {
				write(t, filepath.Join(root, p), c)
			}
			tt.cfg.CertsDir = root
			tt.cfg.DialTimeout = 200 * time.Millisecond
			if err := Write(tt.cfg); err != nil {
				t.Fatal(err)
			}
			got, err := containerdHosts(root, tt.pull)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(views(got), tt.want) {
				t.Errorf("containerd hosts:\n got %+v\nwant %+v", views(got), tt.want)
			}
		})
	}
}

// TestContainerdReadsRender checks the printed (user data) variant too.
func TestContainerdReadsRender(t *testing.T) {
	files, err := Render(Config{MirrorTargets: []string{local}, Registries: []string{"https://docker.io", "http://10.1.2.3:5000"}, DialTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	for p, b := range files {
		write(t, filepath.Join(root, filepath.FromSlash(p)), string(b))
	}
	for _, host := range []string{"docker.io", "10.1.2.3:5000"} {
		hs, err := containerdHosts(root, host)
		if err != nil {
			t.Fatal(err)
		}
		if len(hs) != 2 || hs[0].Host != "127.0.0.1:30120" || hs[0].Capabilities != capsMirror {
			t.Errorf("%s: %+v", host, views(hs))
		}
	}
}

// FuzzPrepend: for any existing hosts.toml, prepending either fails with an
// error or yields a file containerd accepts, with our mirror first and the
// user's hosts and server behaving exactly as before.
func FuzzPrepend(f *testing.F) {
	for _, s := range []string{
		userFile,
		"",
		"server = \"https://registry-1.docker.io\"\n[host.\"https://m\"]\ncapabilities = [\"pull\"]\n",
		"[host.\"https://a\"]\n[host.\"https://b\"]\n[host.\"https://a\".header]\nx = \"y\"\n",
		"override_path = true\n[host.'x']\ndial_timeout = '1s'\nclient = [['a', 'b'], 'c']\n",
		"[host]\n\"https://inline\" = { capabilities = [\"pull\"] }\n",
		"capabilities = [\"PULL\"]\nskip_verify = false\n[header]\nx = [\"1\"]\n",
		"[host.\"http://127.0.0.1:30120\"]\ncapabilities = [\"push\"]\n",
	} {
		f.Add([]byte(s))
	}
	reg := Registry{Host: "ghcr.io", Server: "https://ghcr.io", Dir: "ghcr.io"}
	mirrors := []string{local}
	f.Fuzz(func(t *testing.T, data []byte) {
		ex, err := parseExisting(data)
		if err != nil {
			return
		}
		out, err := renderFile(mirrors, 200*time.Millisecond, reg, ex, false)
		if err != nil {
			return
		}
		root := t.TempDir()
		ours, orig := filepath.Join(root, "ours"), filepath.Join(root, "orig")
		write(t, filepath.Join(ours, "ghcr.io", FileName), string(out))
		write(t, filepath.Join(orig, "ghcr.io", FileName), string(data))

		got, gotErr := containerdHosts(ours, "ghcr.io")
		want, wantErr := containerdHosts(orig, "ghcr.io")
		if gotErr != nil {
			// Only possible after a successful parse: loading TLS files
			// named in the user's (preserved) settings failed. It must
			// fail the same way for the original file.
			g := strings.ReplaceAll(gotErr.Error(), ours, "")
			if wantErr == nil || g != strings.ReplaceAll(wantErr.Error(), orig, "") {
				t.Fatalf("containerd: %v (original: %v)\n%s", gotErr, wantErr, out)
			}
			return
		}
		if len(got) < 2 || got[0].Host != "127.0.0.1:30120" || got[0].Capabilities != capsMirror {
			t.Fatalf("containerd did not take our mirror first: %+v\n%s", views(got), out)
		}
		if wantErr != nil {
			t.Fatalf("original fails (%v) but ours does not\n%s", wantErr, out)
		}
		if strings.Contains(string(data), "127.0.0.1:30120") || hasRepeatedHost(data) {
			return // deliberately deduplicated, not comparable
		}
		if !reflect.DeepEqual(views(got[1:]), views(want)) {
			t.Fatalf("user's hosts changed:\n got %+v\nwant %+v\n--- input\n%s\n--- output\n%s", views(got[1:]), views(want), data, out)
		}
	})
}

// hasRepeatedHost reports whether containerd's own ordering (which only
// skips consecutive repeats) would try a host twice, e.g. [host.a],
// [host.b], [host.a.header]; we list each host once.
func hasRepeatedHost(b []byte) bool {
	order, err := hostOrder(b)
	if err != nil {
		return true
	}
	return containerdOrderLen(b) != len(order)
}

// containerdOrderLen counts hosts as containerd's getSortedHosts does.
func containerdOrderLen(b []byte) int {
	var p unstable.Parser
	p.Reset(b)
	n, host := 0, ""
	for p.NextExpression() {
		e := p.Expression()
		if e.Kind != unstable.Table {
			continue
		}
		var parts []string
		for it := e.Key(); it.Next(); {
			parts = append(parts, string(it.Node().Data))
		}
		if len(parts) < 2 || parts[0] != "host" || parts[1] == host {
			continue
		}
		host = parts[1]
		n++
	}
	return n
}
