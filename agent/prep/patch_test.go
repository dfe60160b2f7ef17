package prep

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

var update = flag.Bool("update", false, "rewrite testdata/golden from the current output")

const certsDir = "/etc/containerd/certs.d"

// fakeRestarter records restarts; unit tests of the file handling use it,
// the D-Bus path is tested in containerd_test.go and agent/systemd.
type fakeRestarter struct {
	restarts int
	checkErr error
}

func (f *fakeRestarter) CheckUnit(context.Context, string) error { return f.checkErr }
func (f *fakeRestarter) RestartUnit(context.Context, string) error {
	f.restarts++
	return nil
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// copyTree copies testdata/<name> (a file or a folder with config.toml)
// into a fresh folder and returns the config's path there.
func copyTree(t *testing.T, name string) string {
	t.Helper()
	dst := t.TempDir()
	src := filepath.Join("testdata", name)
	fi, err := os.Stat(src)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.IsDir() {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dst, "config.toml")
		if err := os.WriteFile(p, b, 0o640); err != nil {
			t.Fatal(err)
		}
		return p
	}
	err = filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o640)
	})
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dst, "config.toml")
}

// TestGolden patches realistic configs and compares with testdata/golden;
// a second run must change and restart nothing; the backup holds the input.
func TestGolden(t *testing.T) {
	cases := []struct {
		name     string
		override bool
		changes  bool
	}{
		{"containerd-1.6-default.toml", false, true},
		{"containerd-1.7-default.toml", false, true},
		{"containerd-2.4-default.toml", false, true},
		{"eks-al2-1.7.toml", false, true},
		{"eks-al2023-2.x.toml", true, true}, // its config_path list needs the override (see namesDir)
		{"gke-cos-hostsd.toml", true, true},
		{"imports", false, true},
		{"comments-dotted-1.6.toml", false, true},
		{"crlf-1.6.toml", false, true},
		{"minimal-2.x.toml", false, true},
		{"mixed-quotes-2.x.toml", false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := copyTree(t, tc.name)
			orig, _ := os.ReadFile(path)
			cfg := Config{Options: Options{CertsDir: certsDir, OverrideConfigPath: tc.override}, Path: path,
				HostRoot: filepath.Dir(path), Unit: "containerd.service", RestartTimeout: 10 * time.Second}
			r := &fakeRestarter{}
			plan, err := Run(context.Background(), cfg, r, quiet)
			if err != nil {
				t.Fatal(err)
			}
			if plan.Changed != tc.changes {
				t.Fatalf("changed = %v, want %v", plan.Changed, tc.changes)
			}
			got, _ := os.ReadFile(path)
			golden := filepath.Join("testdata", "golden", strings.TrimSuffix(tc.name, ".toml")+".golden")
			if *update {
				os.MkdirAll(filepath.Dir(golden), 0o755)
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("patched file differs from %s:\n%s", golden, got)
			}
			assertSettings(t, got, plan.Version)
			if r.restarts != 1 {
				t.Errorf("restarts = %d, want 1", r.restarts)
			}
			backup, err := os.ReadFile(path + BackupSuffix)
			if err != nil || !bytes.Equal(backup, orig) {
				t.Errorf("backup %s does not hold the original (err %v)", path+BackupSuffix, err)
			}
			if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
				t.Errorf("mode = %v, want 0640 kept", fi.Mode().Perm())
			}
			// Only the managed keys may be new lines; nothing removed.
			if missing := missingLines(orig, got); len(missing) > 0 {
				t.Errorf("lines of the original lost: %q", missing)
			}

			plan2, err := Run(context.Background(), cfg, r, quiet)
			if err != nil {
				t.Fatal(err)
			}
			again, _ := os.ReadFile(path)
			if plan2.Changed || !bytes.Equal(again, got) || r.restarts != 1 {
				t.Errorf("second run: changed=%v restarts=%d, file same=%v; want no change and no restart", plan2.Changed, r.restarts, bytes.Equal(again, got))
			}
			if p, err := Check(cfg); err != nil || !p.Ready() {
				t.Errorf("check after prep: ready=%v err=%v", p != nil && p.Ready(), err)
			}
		})
	}
}

// assertSettings reads the file with a plain TOML decoder, as containerd
// does, and checks the settings of that config version.
func assertSettings(t *testing.T, b []byte, version int) {
	t.Helper()
	var m map[string]any
	if err := toml.Unmarshal(b, &m); err != nil {
		t.Fatalf("patched file does not parse: %v", err)
	}
	cps, discard := targets(version)
	for _, c := range cps {
		if v := lookup(m, append(c.table, c.key)); !namesDir(v, certsDir, version) {
			t.Errorf("%v %s = %#v, want %q first", c.table, c.key, v, certsDir)
		}
	}
	if v := lookup(m, append(discard.table, discard.key)); v != false {
		t.Errorf("%v %s = %#v, want false", discard.table, discard.key, v)
	}
}

// missingLines returns the lines of a that b lacks, ignoring lines whose
// value prep changes.
func missingLines(a, b []byte) []string {
	have := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		have[l] = true
	}
	var out []string
	for _, l := range strings.Split(string(a), "\n") {
		if !have[l] && !strings.Contains(l, "config_path") && !strings.Contains(l, "discard_unpacked_layers") {
			out = append(out, l)
		}
	}
	return out
}

// TestRefusals: each case is refused with a message naming the problem,
// and the file is left as it was, with no backup and no restart.
func TestRefusals(t *testing.T) {
	cases := []struct {
		name, config string
		setup        func(dir string)
		restartErr   error
		want         string
		elsewhere    bool
	}{
		{name: "unparsable", config: "version = 2\n[plugins\n", want: "does not parse as TOML (line 2, column 9: expected ']' to close table name)"},
		{name: "duplicate key", config: "version = 2\nroot = \"/a\"\nroot = \"/b\"\n", want: "line 3, column 1: key root is already defined"},
		{name: "link to nothing", config: "version = 2\n", setup: func(d string) { relink(d, "/etc/containerd/real/config.toml") },
			want: "leads to " + "%DIR%/etc/containerd/real/config.toml, which this process cannot read"},
		{name: "link loop", config: "version = 2\n", setup: func(d string) { relink(d, "config.toml") }, want: "too many levels of symbolic links"},
		{name: "list config_path in v3", config: "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n",
			want: "reads config_path as one folder", elsewhere: true},
		{name: "no version", config: "[plugins.cri]\n  sandbox_image = \"x\"\n", want: "no `version` line"},
		{name: "version 1", config: "version = 1\n", want: "config version 1"},
		{name: "version 9", config: "version = 9\n", want: "config version 9"},
		{name: "mirrors", config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m\"]\n", want: "`mirrors` entries"},
		{name: "inline registry", config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  registry = { config_path = \"\" }\n", want: "written inline"},
		{name: "inline plugins", config: "version = 3\nplugins = {}\n", want: "written inline"},
		{name: "array of tables", config: "version = 3\n[[plugins]]\n  x = 1\n", want: "array of tables"},
		{name: "config_path not a string", config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = 3\n", want: "not a string"},
		{name: "discard not a bool", config: "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  discard_unpacked_layers = \"yes\"\n", want: "not true or false"},
		{name: "legacy registry in v3", config: "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/x\"\n", want: "copies over"},
		{name: "config_path elsewhere", config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/docker/certs.d\"\n",
			want: "--certs-dir=/etc/docker/certs.d", elsewhere: true},
		{name: "k3s template", config: "version = 2\n", setup: func(d string) { os.WriteFile(filepath.Join(d, "config.toml.tmpl"), nil, 0o644) }, want: "k3s or RKE2"},
		{name: "k3s header", config: "# File generated by k3s. DO NOT EDIT. Use config.toml.tmpl instead.\nversion = 2\n", want: "k3s or RKE2"},
		{name: "talos", config: "version = 2\n", setup: osRelease("talos"), want: "Talos"},
		{name: "bottlerocket", config: "version = 2\n", setup: osRelease("bottlerocket"), want: "Bottlerocket"},
		{name: "import sets keys", config: "@imports-conflict", want: "50-registry.toml, which sets"},
		{name: "import unparsable", config: "version = 2\nimports = [\"bad.toml\"]\n",
			setup: func(d string) { os.WriteFile(filepath.Join(d, "bad.toml"), []byte("= x"), 0o644) }, want: "bad.toml, which does not parse"},
		{name: "no systemd", config: "version = 2\n", restartErr: errors.New("dial unix /run/systemd/private: no such file"), want: "cannot restart containerd.service through systemd"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var path string
			if name, ok := strings.CutPrefix(tc.config, "@"); ok {
				path = copyTree(t, name)
			} else {
				path = filepath.Join(t.TempDir(), "config.toml")
				if err := os.WriteFile(path, []byte(tc.config), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if tc.setup != nil {
				tc.setup(filepath.Dir(path))
			}
			orig, _ := os.ReadFile(path)
			r := &fakeRestarter{checkErr: tc.restartErr}
			cfg := Config{Options: Options{CertsDir: certsDir}, Path: path, HostRoot: filepath.Dir(path), Unit: "containerd.service", RestartTimeout: time.Second}
			_, err := Run(context.Background(), cfg, r, quiet)
			if err == nil {
				t.Fatal("not refused")
			}
			want := strings.ReplaceAll(tc.want, "%DIR%", filepath.Dir(path))
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q: want ErrRefused mentioning %q", err, want)
			}
			if errors.Is(err, ErrConfigPathElsewhere) != tc.elsewhere {
				t.Errorf("errors.Is(err, ErrConfigPathElsewhere) = %v", !tc.elsewhere)
			}
			t.Log(err)
			after, _ := os.ReadFile(path)
			if !bytes.Equal(after, orig) || r.restarts != 0 {
				t.Errorf("refused but touched: file changed=%v restarts=%d", !bytes.Equal(after, orig), r.restarts)
			}
			if _, err := os.Stat(path + BackupSuffix); err == nil {
				t.Error("refused but wrote a backup")
			}
		})
	}
}

// relink replaces dir/config.toml by a symbolic link to target.
func relink(dir, target string) {
	os.Remove(filepath.Join(dir, "config.toml"))
	os.Symlink(target, filepath.Join(dir, "config.toml"))
}

func osRelease(id string) func(string) {
	return func(dir string) {
		os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
		os.WriteFile(filepath.Join(dir, "etc", "os-release"), []byte("NAME=x\nID="+id+"\n"), 0o644)
	}
}

// TestOverrideConfigPath: with the override, a foreign config_path is
// replaced by ours.
func TestOverrideConfigPath(t *testing.T) {
	in := "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/docker/certs.d\" # ours\n"
	plan, err := Patch([]byte(in), Options{CertsDir: certsDir, OverrideConfigPath: true})
	if err != nil {
		t.Fatal(err)
	}
	// No ancestor of the discard table has a header: the new table goes
	// at the end, its key indented like the file's other keys.
	want := "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\" # ours\n" +
		"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = false\n"
	if string(plan.Patched) != want {
		t.Errorf("got:\n%s\nwant:\n%s", plan.Patched, want)
	}
}

// FuzzPatch: any input is refused with an error, or yields a file that
// parses, has both settings, and differs from the input only in them. It
// never panics.
func FuzzPatch(f *testing.F) {
	entries, _ := os.ReadDir("testdata")
	for _, e := range entries {
		if b, err := os.ReadFile(filepath.Join("testdata", e.Name())); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("version = 3\n"))
	f.Add([]byte("version = 2\n[plugins.'io.containerd.grpc.v1.cri']\n  registry.config_path = ''\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		plan, err := Patch(in, Options{CertsDir: certsDir})
		if err != nil {
			if plan != nil && plan.Patched != nil {
				t.Fatal("error with a patched file")
			}
			return
		}
		var m map[string]any
		if err := toml.Unmarshal(plan.Patched, &m); err != nil {
			t.Fatalf("patched file does not parse: %v\n%s", err, plan.Patched)
		}
		cps, discard := targets(plan.Version)
		for _, c := range cps {
			if v := lookup(m, append(c.table, c.key)); !namesDir(v, certsDir, plan.Version) {
				t.Fatalf("%v %s = %#v after patch:\n%s", c.table, c.key, v, plan.Patched)
			}
		}
		if v := lookup(m, append(discard.table, discard.key)); v != false {
			t.Fatalf("discard = %#v after patch:\n%s", v, plan.Patched)
		}
		again, err := Patch(plan.Patched, Options{CertsDir: certsDir})
		if err != nil || again.Changed {
			t.Fatalf("second patch: err=%v changed=%v", err, again != nil && again.Changed)
		}
	})
}

// TestEmptyFile: a file without keys is containerd's defaults. It becomes
// a version 2 file (read by 1.6, 1.7 and, migrated, 2.x) holding the
// settings; comments and blank lines stay. A second run changes nothing.
func TestEmptyFile(t *testing.T) {
	for name, in := range map[string]string{
		"empty":    "",
		"blank":    "\n  \n\t\n",
		"comments": "# managed by the image; containerd's defaults\n# see containerd config default\n",
		"crlf":     "# defaults\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(path, []byte(in), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := Config{Options: Options{CertsDir: certsDir}, Path: path, HostRoot: filepath.Dir(path), Unit: "containerd.service", RestartTimeout: time.Second}
			r := &fakeRestarter{}
			plan, err := Run(context.Background(), cfg, r, quiet)
			if err != nil {
				t.Fatal(err)
			}
			if !plan.FromEmpty || !plan.Changed || plan.Version != 2 || r.restarts != 1 {
				t.Fatalf("fromEmpty=%v changed=%v version=%d restarts=%d; want a version 2 file and one restart", plan.FromEmpty, plan.Changed, plan.Version, r.restarts)
			}
			got, _ := os.ReadFile(path)
			t.Logf("patched:\n%s", got)
			if !strings.HasPrefix(string(got), in) {
				t.Errorf("the original text is not kept at the top:\n%q", got)
			}
			assertSettings(t, got, 2)
			if backup, _ := os.ReadFile(path + BackupSuffix); string(backup) != in {
				t.Errorf("backup %q, want the empty original", backup)
			}
			if plan, err := Run(context.Background(), cfg, r, quiet); err != nil || plan.Changed || plan.FromEmpty || r.restarts != 1 {
				t.Errorf("second run: err=%v changed=%v restarts=%d", err, plan != nil && plan.Changed, r.restarts)
			}
		})
	}
}

// TestSymlink: a config.toml that is a symbolic link (relative, or
// absolute and so read under the host root) is followed: its target is
// patched in place, with the backup beside it, and the link stays a link.
func TestSymlink(t *testing.T) {
	for _, tc := range []struct{ name, link, target string }{
		{"relative", "config-generated.toml", "config-generated.toml"},
		{"absolute", "/etc/containerd/real/config.toml", "etc/containerd/real/config.toml"},
		{"chain", "link2.toml", "etc/containerd/real/config.toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			path := filepath.Join(root, "config.toml")
			target := filepath.Join(root, tc.target)
			os.MkdirAll(filepath.Dir(target), 0o755)
			in, err := os.ReadFile(filepath.Join("testdata", "eks-al2-1.7.toml"))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(target, in, 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.name == "chain" {
				os.Symlink("/etc/containerd/real/config.toml", filepath.Join(root, "link2.toml"))
			}
			if err := os.Symlink(tc.link, path); err != nil {
				t.Fatal(err)
			}
			cfg := Config{Options: Options{CertsDir: certsDir}, Path: path, HostRoot: root, Unit: "containerd.service", RestartTimeout: time.Second}
			r := &fakeRestarter{}
			var logs strings.Builder
			plan, err := Run(context.Background(), cfg, r, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			if plan.Path != target || !plan.Changed || r.restarts != 1 {
				t.Fatalf("path=%s changed=%v restarts=%d; want %s patched and one restart", plan.Path, plan.Changed, r.restarts, target)
			}
			if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSymlink == 0 {
				t.Fatalf("config.toml is no longer a link: %v %v", fi.Mode(), err)
			}
			got, _ := os.ReadFile(target)
			assertSettings(t, got, 2)
			if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o600 {
				t.Errorf("target mode %v, want 0600 kept", fi.Mode().Perm())
			}
			if b, _ := os.ReadFile(target + BackupSuffix); !bytes.Equal(b, in) {
				t.Error("no backup of the original beside the target")
			}
			if !strings.Contains(logs.String(), "symbolic link") || !strings.Contains(logs.String(), target) {
				t.Errorf("the log does not say the link was followed:\n%s", logs.String())
			}
			if p, err := Check(cfg); err != nil || !p.Ready() {
				t.Errorf("check through the link after prep: ready=%v err=%v", p != nil && p.Ready(), err)
			}
		})
	}
}
