package hosts

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

const header = markerLine + "\n" + headerNote

const local = "http://127.0.0.1:30120"

func mirrorBlock(url string) string {
	return "\n[host.\"" + url + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"200ms\"\n"
}

func TestRender(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want map[string]string
	}{
		{
			name: "single registry",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io"}, DialTimeout: 200 * time.Millisecond},
			want: map[string]string{
				"ghcr.io/hosts.toml": header + "server = \"https://ghcr.io\"\n" + mirrorBlock(local),
			},
		},
		{
			name: "several registries and mirrors, docker.io server",
			cfg: Config{
				MirrorTargets: []string{local, "https://10.0.0.7:30121/"},
				Registries:    []string{"https://docker.io", "https://quay.io/"},
				DialTimeout:   200 * time.Millisecond,
			},
			want: map[string]string{
				"docker.io/hosts.toml": header + "server = \"https://registry-1.docker.io\"\n" +
					mirrorBlock(local) + mirrorBlock("https://10.0.0.7:30121"),
				"quay.io/hosts.toml": header + "server = \"https://quay.io\"\n" +
					mirrorBlock(local) + mirrorBlock("https://10.0.0.7:30121"),
			},
		},
		{
			name: "all registries via _default has no server",
			cfg:  Config{MirrorTargets: []string{local}, DialTimeout: 200 * time.Millisecond},
			want: map[string]string{
				"_default/hosts.toml": header + mirrorBlock(local),
			},
		},
		{
			name: "registry with port, plain http",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"http://10.1.2.3:5000"}, DialTimeout: 200 * time.Millisecond},
			want: map[string]string{
				"10.1.2.3:5000/hosts.toml": header + "server = \"http://10.1.2.3:5000\"\n" + mirrorBlock(local),
			},
		},
		{
			name: "no dial timeout leaves containerd default",
			cfg:  Config{MirrorTargets: []string{local}, Registries: []string{"HTTPS://ghcr.io"}},
			want: map[string]string{
				"ghcr.io/hosts.toml": header + "server = \"https://ghcr.io\"\n\n[host.\"" + local + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Render(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got files %v, want %v", keys(got), keys(tt.want))
			}
			for name, want := range tt.want {
				if string(got[name]) != want {
					t.Errorf("%s:\n--- got\n%s\n--- want\n%s", name, got[name], want)
				}
			}
			again, _ := Render(tt.cfg)
			for name := range got {
				if string(again[name]) != string(got[name]) {
					t.Errorf("%s: output not deterministic", name)
				}
			}
		})
	}
}

func keys[V any](m map[string]V) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	sort.Strings(k)
	return k
}

func TestValidateErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want []string // substrings of the error
	}{
		{"no scheme", Config{MirrorTargets: []string{local}, Registries: []string{"ghcr.io"}}, []string{`"ghcr.io"`, "missing scheme", `"https://ghcr.io"`}},
		{"host:port without scheme", Config{MirrorTargets: []string{local}, Registries: []string{"10.1.2.3:5000"}}, []string{`"10.1.2.3:5000"`, "missing scheme"}},
		{"bad scheme", Config{MirrorTargets: []string{local}, Registries: []string{"oci://ghcr.io"}}, []string{`"oci://ghcr.io"`, "http:// or https://"}},
		{"path", Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io/org"}}, []string{`"https://ghcr.io/org"`, "must not have a path", `"https://ghcr.io"`}},
		{"no host", Config{MirrorTargets: []string{local}, Registries: []string{"https://"}}, []string{`"https://"`, "host is missing"}},
		{"query", Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io?x=1"}}, []string{`"https://ghcr.io?x=1"`, "query"}},
		{"credentials", Config{MirrorTargets: []string{local}, Registries: []string{"https://u:p@ghcr.io"}}, []string{`"https://u:p@ghcr.io"`, "credentials"}},
		{"bad port", Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io:99999"}}, []string{`"https://ghcr.io:99999"`, "port"}},
		{"empty", Config{MirrorTargets: []string{local}, Registries: []string{" "}}, []string{"empty"}},
		{"docker.io over http", Config{MirrorTargets: []string{local}, Registries: []string{"http://docker.io"}}, []string{`"http://docker.io"`, "https://docker.io"}},
		{"duplicate registry", Config{MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io", "http://ghcr.io"}}, []string{`"http://ghcr.io"`, "ghcr.io"}},
		{"no mirrors", Config{Registries: []string{"https://ghcr.io"}}, []string{"no mirror targets"}},
		{"bad mirror", Config{MirrorTargets: []string{"127.0.0.1:30120"}}, []string{`mirror target "127.0.0.1:30120"`, "missing scheme"}},
		{"mirror with path", Config{MirrorTargets: []string{"http://127.0.0.1:30120/v2"}}, []string{`"http://127.0.0.1:30120/v2"`, "path"}},
		{"duplicate mirror", Config{MirrorTargets: []string{local, local + "/"}}, []string{"duplicates"}},
		{"negative dial timeout", Config{MirrorTargets: []string{local}, DialTimeout: -time.Second}, []string{"negative"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if _, err := Render(tt.cfg); err == nil {
				t.Error("Render accepted an invalid config")
			}
			tt.cfg.CertsDir = t.TempDir()
			if err := Write(tt.cfg); err == nil {
				t.Error("Write accepted an invalid config")
			}
		})
	}
}

func TestParseRegistry(t *testing.T) {
	tests := []struct {
		in   string
		want Registry
	}{
		{"https://docker.io", Registry{Host: "docker.io", Server: "https://registry-1.docker.io", Dir: "docker.io"}},
		{"https://ghcr.io/", Registry{Host: "ghcr.io", Server: "https://ghcr.io", Dir: "ghcr.io"}},
		{"http://10.1.2.3:5000", Registry{Host: "10.1.2.3:5000", Server: "http://10.1.2.3:5000", Dir: "10.1.2.3:5000"}},
		{"https://[fd00::1]:5000", Registry{Host: "[fd00::1]:5000", Server: "https://[fd00::1]:5000", Dir: "[fd00::1]:5000"}},
	}
	for _, tt := range tests {
		got, err := ParseRegistry(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseRegistry(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
}

func write(t *testing.T, name, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func exists(name string) bool {
	_, err := os.Lstat(name)
	return err == nil
}

const userFile = `# my registry config
server = "https://proxy.corp.example"
capabilities = ["pull", "resolve"]

[host."https://b.example"]
  capabilities = ["pull"]
  skip_verify = true

[host."https://a.example"]
  ca = "a.crt"
  [host."https://a.example".header]
    x-a = ["1", "2"]
`

func TestPrepend(t *testing.T) {
	tests := []struct {
		name     string
		registry string
		dir      string // where the user's file is
		existing string
		want     string // file we write into the registry's own dir
	}{
		{
			name:     "existing hosts kept in order after ours, user's server wins",
			registry: "https://ghcr.io",
			dir:      "ghcr.io",
			existing: userFile,
			want: header +
				"server = \"https://proxy.corp.example\"\n" +
				"capabilities = ['pull', 'resolve']\n" +
				mirrorBlock(local) +
				"\n[host.'https://b.example']\ncapabilities = ['pull']\nskip_verify = true\n" +
				"\n[host.'https://a.example']\nca = 'a.crt'\n\n[host.'https://a.example'.header]\nx-a = ['1', '2']\n",
		},
		{
			name:     "no server stays implicit; a host equal to our mirror is not repeated",
			registry: "https://docker.io",
			dir:      "docker.io",
			existing: "[host.\"" + local + "\"]\ncapabilities = [\"pull\"]\n[host.\"https://z.example\"]\n",
			want:     header + mirrorBlock(local) + "\n[host.'https://z.example']\n",
		},
		{
			name:     "http registry gets explicit server",
			registry: "http://10.1.2.3:5000",
			dir:      "10.1.2.3:5000",
			existing: "[host.\"https://z.example\"]\n",
			want:     header + "server = \"http://10.1.2.3:5000\"\n" + mirrorBlock(local) + "\n[host.'https://z.example']\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			userPath := filepath.Join(root, tt.dir, FileName)
			write(t, userPath, tt.existing)
			cfg := Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{tt.registry}, DialTimeout: 200 * time.Millisecond, Prepend: true}
			if err := Write(cfg); err != nil {
				t.Fatal(err)
			}
			r, _ := ParseRegistry(tt.registry)
			ourPath := filepath.Join(root, r.Dir, FileName)
			if got := read(t, ourPath); got != tt.want {
				t.Errorf("got\n%s\nwant\n%s", got, tt.want)
			}
			if err := Cleanup(root); err != nil {
				t.Fatal(err)
			}
			if got := read(t, userPath); got != tt.existing {
				t.Errorf("user's file after cleanup:\n%s", got)
			}
			if userPath != ourPath && exists(filepath.Dir(ourPath)) {
				t.Errorf("our directory %s left behind", filepath.Dir(ourPath))
			}
		})
	}
}

func TestPrependRejectsInvalid(t *testing.T) {
	for name, content := range map[string]string{
		"syntax":             "[host.\"https://a\"\ncapabilities = [",
		"unknown capability": "[host.\"https://a\"]\ncapabilities = [\"fly\"]\n",
		"bad dial_timeout":   "dial_timeout = \"soon\"\n",
		"wrong type":         "[host.\"https://a\"]\ncapabilities = \"pull\"\n",
		"header table":       "[host.\"https://a\".header.x]\ny = 1\n",
	} {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			p := filepath.Join(root, "ghcr.io", FileName)
			write(t, p, content)
			err := Write(Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io"}, Prepend: true})
			if err == nil || !strings.Contains(err.Error(), p) {
				t.Fatalf("error %v does not name %s", err, p)
			}
			if got := read(t, p); got != content {
				t.Errorf("file modified: %q", got)
			}
			if exists(p + BackupSuffix) {
				t.Error("backup written for a refused file")
			}
		})
	}
}

func TestWriteIdempotentAndBackup(t *testing.T) {
	root := t.TempDir()
	userPath := filepath.Join(root, "docker.io", FileName)
	write(t, userPath, userFile)
	cfg := Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{"https://docker.io", "https://ghcr.io"}, DialTimeout: 200 * time.Millisecond}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if got := read(t, userPath+BackupSuffix); got != userFile {
		t.Fatalf("backup = %q", got)
	}
	st, _ := os.Stat(userPath + BackupSuffix)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("backup mode %v, want the original 0600", st.Mode().Perm())
	}
	want := header + "server = \"https://registry-1.docker.io\"\n" + mirrorBlock(local)
	if got := read(t, userPath); got != want {
		t.Fatalf("got\n%s", got)
	}
	st, _ = os.Stat(userPath)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644", st.Mode().Perm())
	}
	ghcr := filepath.Join(root, "ghcr.io", FileName)
	if !strings.HasPrefix(read(t, ghcr), markerLineCreatedDir+"\n") {
		t.Errorf("ghcr.io file does not record the directory as ours")
	}

	// Second write: nothing changes, not even the inode (no rewrite).
	before := map[string]os.FileInfo{}
	for _, p := range []string{userPath, userPath + BackupSuffix, ghcr} {
		before[p], _ = os.Stat(p)
	}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	for p, fi := range before {
		now, err := os.Stat(p)
		if err != nil || !os.SameFile(fi, now) {
			t.Errorf("%s rewritten by an unchanged config", p)
		}
	}

	// A changed config rewrites ours but keeps the original backup.
	cfg.DialTimeout = time.Second
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(read(t, userPath), `dial_timeout = "1s"`) {
		t.Error("not rewritten on change")
	}
	if got := read(t, userPath+BackupSuffix); got != userFile {
		t.Fatalf("backup changed: %q", got)
	}

	// Dropping ghcr.io removes our dir; dropping docker.io restores the user's file.
	cfg.Registries = []string{"https://docker.io"}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Dir(ghcr)) {
		t.Error("ghcr.io directory we created was not removed")
	}
	cfg.Registries = []string{"https://quay.io"}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if got := read(t, userPath); got != userFile || exists(userPath+BackupSuffix) {
		t.Errorf("docker.io not restored: %q", got)
	}
}

func TestCleanup(t *testing.T) {
	root := t.TempDir()
	// A user directory that holds only certificates: ours goes in and out.
	write(t, filepath.Join(root, "certs.example", "ca.crt"), "pem")
	// A user's hosts.toml to back up and restore.
	write(t, filepath.Join(root, "docker.io", FileName), userFile)
	// A registry we are not configured for: never touched.
	write(t, filepath.Join(root, "other.example", FileName), "server = \"https://other.example\"\n")

	cfg := Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{"https://docker.io", "https://certs.example", "https://ghcr.io"}}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // safe to run twice
		if err := Cleanup(root); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(root, "docker.io", FileName)); got != userFile {
			t.Errorf("docker.io not restored: %q", got)
		}
		if exists(filepath.Join(root, "docker.io", FileName+BackupSuffix)) {
			t.Error("backup left behind")
		}
		if exists(filepath.Join(root, "certs.example", FileName)) || !exists(filepath.Join(root, "certs.example", "ca.crt")) {
			t.Error("certs.example: ours should be gone, the user's cert kept")
		}
		if exists(filepath.Join(root, "ghcr.io")) {
			t.Error("ghcr.io directory we created is still there")
		}
		if got := read(t, filepath.Join(root, "other.example", FileName)); got != "server = \"https://other.example\"\n" {
			t.Error("unrelated file touched")
		}
	}
	if err := Cleanup(filepath.Join(root, "missing")); err != nil {
		t.Errorf("cleanup of a missing dir: %v", err)
	}
}

// An agent killed between writing a temp file and renaming it leaves the
// temp behind: cleanup removes it, Write removes it once it is stale, and
// neither touches other dot files.
func TestLeftoverTempFiles(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "docker.io", FileName), userFile)
	cfg := Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{"https://docker.io"}}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "docker.io")
	old := time.Now().Add(-2 * staleTemp)
	stale := []string{"." + FileName + ".tmp-1234", "." + FileName + BackupSuffix + ".tmp-5678"}
	for _, n := range stale {
		write(t, filepath.Join(dir, n), "partial")
		if err := os.Chtimes(filepath.Join(dir, n), old, old); err != nil {
			t.Fatal(err)
		}
	}
	fresh := "." + FileName + ".tmp-9999"
	write(t, filepath.Join(dir, fresh), "in flight")
	other := ".hosts.toml.swp"
	write(t, filepath.Join(dir, other), "an editor's")

	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	for _, n := range stale {
		if exists(filepath.Join(dir, n)) {
			t.Errorf("Write left the stale temp file %s", n)
		}
	}
	if !exists(filepath.Join(dir, fresh)) {
		t.Errorf("Write removed %s, which a writer may still be renaming", fresh)
	}
	if err := Cleanup(root); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Join(dir, fresh)) {
		t.Errorf("Cleanup left the temp file %s", fresh)
	}
	if !exists(filepath.Join(dir, other)) {
		t.Errorf("Cleanup removed %s, which is not ours", other)
	}
	if got := read(t, filepath.Join(dir, FileName)); got != userFile {
		t.Errorf("user's file not restored: %q", got)
	}
}

func TestUserReplacedOurFile(t *testing.T) {
	root := t.TempDir()
	p := filepath.Join(root, "docker.io", FileName)
	write(t, p, "# v1\n")
	cfg := Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{"https://docker.io"}}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	// The user (or their config management) writes a new version over ours.
	write(t, p, "# v2\n")
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if got := read(t, p+BackupSuffix); got != "# v2\n" {
		t.Errorf("backup should follow the user's newest file, got %q", got)
	}
	if err := Cleanup(root); err != nil {
		t.Fatal(err)
	}
	if got := read(t, p); got != "# v2\n" {
		t.Errorf("restored %q", got)
	}
}

// Mirroring every registry through _default, a registry with a folder of
// its own (prep's migrated GKE mirror) would skip the agent: with Prepend
// the agent goes first in it too, and cleanup gives the folder back.
func TestMirrorAllKeepsRegistryFolders(t *testing.T) {
	const gke = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.gcr.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	const port = "[host.\"https://z.example\"]\n"
	setup := func(t *testing.T) string {
		root := t.TempDir()
		write(t, filepath.Join(root, "docker.io", FileName), gke)
		write(t, filepath.Join(root, "10.1.2.3_5000_", FileName), port)
		write(t, filepath.Join(root, "certs.example", "ca.crt"), "pem")
		return root
	}
	cfg := func(root string, prepend bool) Config {
		return Config{CertsDir: root, MirrorTargets: []string{local}, DialTimeout: 200 * time.Millisecond, Prepend: prepend}
	}

	t.Run("prepend", func(t *testing.T) {
		root := setup(t)
		for i := 0; i < 2; i++ { // a second run changes nothing
			if err := Write(cfg(root, true)); err != nil {
				t.Fatal(err)
			}
		}
		want := header + "server = \"https://registry-1.docker.io\"\n" + mirrorBlock(local) + "\n[host.'https://mirror.gcr.io']\ncapabilities = ['pull', 'resolve']\n"
		if got := read(t, filepath.Join(root, "docker.io", FileName)); got != want {
			t.Errorf("docker.io:\n%s\nwant\n%s", got, want)
		}
		want = header + mirrorBlock(local) + "\n[host.'https://z.example']\n"
		if got := read(t, filepath.Join(root, "10.1.2.3_5000_", FileName)); got != want {
			t.Errorf("10.1.2.3_5000_:\n%s\nwant\n%s", got, want)
		}
		if exists(filepath.Join(root, "certs.example", FileName)) {
			t.Error("a folder with no hosts.toml got one: it uses _default")
		}
		if !strings.Contains(read(t, filepath.Join(root, DefaultDir, FileName)), local) {
			t.Error("_default does not name the mirror")
		}
		if err := Cleanup(root); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(root, "docker.io", FileName)); got != gke {
			t.Errorf("docker.io not restored: %q", got)
		}
		if got := read(t, filepath.Join(root, "10.1.2.3_5000_", FileName)); got != port {
			t.Errorf("10.1.2.3_5000_ not restored: %q", got)
		}
	})

	t.Run("without prepend the folders are the user's", func(t *testing.T) {
		root := setup(t)
		if err := Write(cfg(root, false)); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(root, "docker.io", FileName)); got != gke {
			t.Errorf("docker.io touched: %q", got)
		}
	})

	t.Run("a folder of ours from an earlier registry list is removed", func(t *testing.T) {
		root := t.TempDir()
		if err := Write(Config{CertsDir: root, MirrorTargets: []string{local}, Registries: []string{"https://ghcr.io"}}); err != nil {
			t.Fatal(err)
		}
		if err := Write(cfg(root, true)); err != nil {
			t.Fatal(err)
		}
		if exists(filepath.Join(root, "ghcr.io")) {
			t.Error("ghcr.io, ours alone, was kept")
		}
	})
}
