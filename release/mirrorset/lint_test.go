package mirrorset

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

const pin = "@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// TestLintRepository runs the lint over this repository: it must pass.
func TestLintRepository(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	findings, err := Lint(root, filepath.Join(root, "mirror-images"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range findings {
		t.Errorf("%s", f)
	}
}

// TestLintPlanted plants every kind of mistake and expects each named by
// file and line.
func TestLintPlanted(t *testing.T) {
	root := t.TempDir()
	set := filepath.Join(root, "mirror-images")
	writeDockerfile(t, set, "good", "FROM ghcr.io/spegel-org/spegel:v0.7.1"+pin+"\n")
	writeDockerfile(t, set, "unpinned", "FROM ghcr.io/spegel-org/spegel:v0.7.1\n")
	writeDockerfile(t, set, "twolines", "FROM busybox"+pin+"\nRUN true\n")
	writeDockerfile(t, set, "legacy", "FROM k8s.gcr.io/pause:3.9"+pin+"\n")
	writeDockerfile(t, set, "collide", "FROM ghcr.io/spegel-org/spegel:v0.7.1"+pin+"\n")
	writeDockerfile(t, set, "options", "FROM --platform=linux/amd64 busybox"+pin+"\n")
	writeDockerfile(t, set, "upper", "FROM Busybox"+pin+"\n")
	if err := os.MkdirAll(filepath.Join(set, "empty"), 0o755); err != nil {
		t.Fatal(err)
	}
	chart := filepath.Join(root, "helm-charts", "x", "values.yaml")
	if err := os.MkdirAll(filepath.Dir(chart), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(chart, []byte("a: 1\nkeepalive:\n  image: gcr.io/google-containers/pause:3.9\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	doc := filepath.Join(root, "docs.md")
	if err := os.WriteFile(doc, []byte("pull gcr.io/google_containers/etcd:3.5 or K8S.GCR.IO\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Tests plant legacy paths on purpose and are not flagged.
	if err := os.WriteFile(filepath.Join(root, "x_test.go"), []byte("k8s.gcr.io/pause\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	findings, err := Lint(root, set)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range findings {
		got = append(got, strings.TrimPrefix(f.String(), root+"/"))
	}
	all := strings.Join(got, "\n")
	t.Logf("findings:\n%s", all)
	for _, want := range []string{
		"mirror-images/unpinned/Dockerfile:1: ghcr.io/spegel-org/spegel:v0.7.1 is not pinned",
		"mirror-images/twolines/Dockerfile:2: 2 lines",
		"mirror-images/legacy/Dockerfile:1: k8s.gcr.io/pause:3.9" + pin + " is on a legacy registry that is shut down: use registry.k8s.io/pause:3.9" + pin,
		"mirror-images/legacy/Dockerfile:1: legacy registry path k8s.gcr.io/pause:3.9",
		"mirror-images/good/Dockerfile:1: lands on ghcr.io/spegel-org/spegel:v0.7.1 in the mirror, like",
		"mirror-images/options/Dockerfile:1: ",
		"mirror-images/upper/Dockerfile:1: invalid image reference \"Busybox" + pin + "\"",
		"mirror-images/empty/Dockerfile: missing",
		"helm-charts/x/values.yaml:3: legacy registry path gcr.io/google-containers/pause:3.9: that registry is shut down and pulls fail; use registry.k8s.io/pause:3.9",
		"docs.md:1: legacy registry path gcr.io/google_containers/etcd:3.5",
		"docs.md:1: legacy registry path K8S.GCR.IO: that registry is shut down and pulls fail; use registry.k8s.io",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no finding %q", want)
		}
	}
	if strings.Contains(all, "x_test.go") {
		t.Errorf("a _test.go file was flagged")
	}
	if len(findings) != 11 {
		t.Errorf("%d findings, want 11", len(findings))
	}
}

func TestImagesMap(t *testing.T) {
	dir := t.TempDir()
	writeDockerfile(t, dir, "spegel", "FROM ghcr.io/spegel-org/spegel:v0.7.1"+pin+"\n")
	writeDockerfile(t, dir, "busybox", "FROM busybox:1.36"+pin+"\n")
	set, fs, err := Load(dir)
	if err != nil || len(fs) != 0 {
		t.Fatal(fs, err)
	}
	path := filepath.Join(dir, MapFile)
	own := map[string]string{"agent": "ghcr.io/fleetmirror/agent:v1" + pin}
	if err := WriteMap(path, set.Map(own)); err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(path)
	m, err := ReadMap(path)
	if err != nil {
		t.Fatal(err)
	}
	if m["busybox"] != "docker.io/library/busybox:1.36"+pin || len(m) != 3 {
		t.Errorf("map %v", m)
	}
	if fs := set.Check(path, m); len(fs) != 0 {
		t.Errorf("check of a fresh map: %v", fs)
	}
	if err := WriteMap(path, m); err != nil {
		t.Fatal(err)
	}
	if second, _ := os.ReadFile(path); string(second) != string(first) {
		t.Errorf("rewriting the map changed it:\n%s\n%s", first, second)
	}

	m["spegel"] = "ghcr.io/spegel-org/spegel:v0.7.2" + pin
	delete(m, "busybox")
	m["stray"] = "ghcr.io/x/y" + pin
	m["operator"] = "ghcr.io/fleetmirror/operator:v1"
	var msgs []string
	for _, f := range set.Check(path, m) {
		msgs = append(msgs, f.String())
	}
	all := strings.Join(msgs, "\n")
	for _, want := range []string{"no entry for busybox", "spegel is ghcr.io/spegel-org/spegel:v0.7.2", "stray has no folder", "operator: ghcr.io/fleetmirror/operator:v1 is not pinned"} {
		if !strings.Contains(all, want) {
			t.Errorf("check: no %q in\n%s", want, all)
		}
	}

	if err := os.WriteFile(path, []byte("images:\nagent: x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadMap(path); err == nil || !strings.Contains(err.Error(), ":2:") {
		t.Errorf("ReadMap of a bad map: %v", err)
	}
}
