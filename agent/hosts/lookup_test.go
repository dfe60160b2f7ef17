package hosts

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/remotes/docker/config"
)

const canaryName = "canary.fleetmirror.invalid"

// The canary's file sends containerd only to the agent: the mirror target
// as host and as server, nothing else, whatever else is mirrored.
func TestCanaryHosts(t *testing.T) {
	root := t.TempDir()
	cfg := Config{CertsDir: root, MirrorTargets: []string{local, "https://10.0.0.7:30121"}, Registries: []string{"https://ghcr.io"}, Canary: canaryName}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	got, err := containerdHosts(root, canaryName)
	if err != nil {
		t.Fatal(err)
	}
	mirror := hostView{"http", "127.0.0.1:30120", "/v2", capsMirror, nil}
	if want := []hostView{mirror, {"http", "127.0.0.1:30120", "/v2", capsAll, nil}}; !reflect.DeepEqual(views(got), want) {
		t.Errorf("containerd hosts for the canary:\n got %+v\nwant %+v", views(got), want)
	}
	// A second Write keeps it; Cleanup removes it with its folder.
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, canaryName, FileName)); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, canaryName)); !os.IsNotExist(err) {
		t.Errorf("canary folder after Cleanup: %v", err)
	}

	// WriteCanary writes that file alone (the node wrote the others).
	if err := WriteCanary(cfg); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 1 || entries[0].Name() != canaryName {
		t.Errorf("WriteCanary wrote %v", entries)
	}

	cfg.Registries = append(cfg.Registries, "https://"+canaryName)
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "canary") {
		t.Errorf("mirroring the canary's name: %v", err)
	}
}

func TestVerify(t *testing.T) {
	cfg := Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io", "http://10.1.2.3:5000"}}
	userFile := "server = \"https://ghcr.io\"\n[host.\"https://proxy.example\"]\n"
	tests := []struct {
		name         string
		write        bool              // Write(cfg) first
		files        map[string]string // then these, "" deletes
		hostPortDirs bool
		want         []string // substrings of the error, none: nil
	}{
		{name: "as written", write: true},
		{name: "as written, 1.6", write: true, hostPortDirs: false},
		{name: "nothing written", want: []string{"ghcr.io/hosts.toml is missing", "10.1.2.3:5000/hosts.toml is missing"}},
		{name: "one deleted", write: true, files: map[string]string{"ghcr.io/hosts.toml": ""},
			want: []string{"ghcr.io/hosts.toml is missing: containerd pulls ghcr.io from upstream"}},
		{name: "replaced by a user's", write: true, files: map[string]string{"ghcr.io/hosts.toml": userFile},
			want: []string{`names "https://proxy.example" first, not the mirror target "http://127.0.0.1:30120"`}},
		{name: "host_port_ shadows on 1.7 and 2.x", write: true, hostPortDirs: true,
			files: map[string]string{"10.1.2.3_5000_/hosts.toml": userFile}, want: []string{"10.1.2.3_5000_ shadows"}},
		{name: "host_port_ is ignored by 1.6", write: true, files: map[string]string{"10.1.2.3_5000_/hosts.toml": userFile}},
		{name: "_default that names the mirror covers a missing folder",
			files: map[string]string{"_default/hosts.toml": "[host.\"" + local + "\"]\n"}},
		{name: "not TOML", write: true, files: map[string]string{"ghcr.io/hosts.toml": "[host.\n"}, want: []string{"containerd ignores the whole file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			cfg := cfg
			cfg.CertsDir = root
			if tt.write {
				if err := Write(cfg); err != nil {
					t.Fatal(err)
				}
			}
			for p, c := range tt.files {
				if c == "" {
					os.Remove(filepath.Join(root, p))
					continue
				}
				write(t, filepath.Join(root, p), c)
			}
			err := Verify(cfg, tt.hostPortDirs)
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Verify: nil, want %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Verify: %v\nwant it to say %q", err, w)
				}
			}
		})
	}
}

// lookupDir finds the folder containerd 2.x's own lookup finds.
func TestLookupDirIsContainerds(t *testing.T) {
	root := t.TempDir()
	r, _ := ParseRegistry("http://10.1.2.3:5000")
	for _, dirs := range [][]string{{"_default"}, {"_default", "10.1.2.3:5000"}, {"10.1.2.3:5000", "10.1.2.3_5000_"}} {
		for _, d := range dirs {
			if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		want, err := config.HostDirFromRoot(root)(r.Host)
		if err != nil {
			t.Fatal(err)
		}
		if got := lookupDir(root, r, true); got != want {
			t.Errorf("with %v: lookupDir %q, containerd %q", dirs, got, want)
		}
	}
}
