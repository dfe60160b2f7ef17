package version

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The repository's charts and default images carry VERSION.
func TestRepositoryAgrees(t *testing.T) {
	bad, err := Check("../..")
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bad {
		t.Errorf("%s (hack/set-version.sh sets them all)", b)
	}
}

// Check names each place that differs.
func TestCheckNamesDifferences(t *testing.T) {
	root := t.TempDir()
	write := func(path, s string) {
		t.Helper()
		p := filepath.Join(root, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(File, "1.2.3\n")
	write("helm-charts/spegel/Chart.yaml", "version: 1.2.3\nappVersion: \"1.2.3\"\n")
	write("helm-charts/operator/Chart.yaml", "version: 1.2.2\nappVersion: \"1.2.3\"\n")
	write("helm-charts/operator/values.yaml", "images:\n  agent: ghcr.io/fleetmirror/agent:1.2.3\n  operator: ghcr.io/fleetmirror/operator:1.2.2\n")
	bad, err := Check(root)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(bad, "\n")
	for _, want := range []string{`helm-charts/operator/Chart.yaml: version is "1.2.2"`, `images.operator is "ghcr.io/fleetmirror/operator:1.2.2"`} {
		if !strings.Contains(got, want) {
			t.Errorf("Check() = %q, want it to contain %q", got, want)
		}
	}
	if len(bad) != 2 {
		t.Errorf("Check() = %q, want 2 findings", bad)
	}
}

func TestReadRefusesNonSemver(t *testing.T) {
	for _, v := range []string{"v1.2.3", "1.2", "dev", ""} {
		root := t.TempDir()
		if err := os.WriteFile(filepath.Join(root, File), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Read(root); err == nil {
			t.Errorf("Read(%q): no error", v)
		}
	}
}
