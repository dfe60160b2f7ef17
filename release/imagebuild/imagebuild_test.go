package imagebuild

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func moduleRoot(t *testing.T) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func testOptions(t *testing.T, module string) Options {
	return Options{Version: "v0.0.0-test", Source: DefaultSourceURL, Module: module, WorkDir: t.TempDir(), LDFlags: "-s -w",
		Created: time.Unix(1700000000, 0)}
}

// TestAgentReproducible builds the agent image twice from scratch, the
// binaries compiled into separate folders: the digests must be equal.
func TestAgentReproducible(t *testing.T) {
	module := moduleRoot(t)
	spec := Specs(module)["agent"]
	var digests []v1.Hash
	for range 2 {
		idx, err := Build(context.Background(), spec, testOptions(t, module))
		if err != nil {
			t.Fatal(err)
		}
		d, err := idx.Digest()
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, d)
	}
	if digests[0] != digests[1] {
		t.Fatalf("two builds of the same inputs: %s and %s", digests[0], digests[1])
	}
	t.Logf("agent image %s", digests[0])
}

// TestOperatorLayout assembles the operator image for two platforms from
// stand-in binaries (cmd/operator is written elsewhere) and checks the
// layout the operator reads, the user, the labels, and determinism.
func TestOperatorLayout(t *testing.T) {
	module := t.TempDir()
	if err := os.MkdirAll(filepath.Join(module, "helm-charts", "spegel", "templates"), 0o755); err != nil {
		t.Fatal(err)
	}
	for p, data := range map[string]string{
		"helm-charts/spegel/Chart.yaml":        "name: spegel\n",
		"helm-charts/spegel/templates/ds.yaml": "kind: DaemonSet\n",
		"watches.yaml":                         "- group: charts.fleetmirror.dev\n",
		"bin/linux_amd64/operator":             "amd64 operator",
		"bin/linux_arm64/operator":             "arm64 operator",
	} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(module, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(module, p), []byte(data), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	spec := Specs(module)["operator"]
	if err := spec.Check(module); err == nil || !strings.Contains(err.Error(), "cmd/operator") {
		t.Errorf("Check without cmd/operator: %v", err)
	}
	o := testOptions(t, module)
	build := func() v1.ImageIndex {
		base, err := baseLayer()
		if err != nil {
			t.Fatal(err)
		}
		files, err := fileLayer(spec.Files)
		if err != nil {
			t.Fatal(err)
		}
		var idx v1.ImageIndex = mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
		for _, p := range []Platform{{"linux", "amd64"}, {"linux", "arm64"}} {
			img, err := Assemble(spec, o, p, base, files, map[string]string{OperatorBinary: filepath.Join(module, "bin", p.OS+"_"+p.Arch, "operator")})
			if err != nil {
				t.Fatal(err)
			}
			idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: p.OS, Architecture: p.Arch}}})
		}
		return idx
	}
	a, b := build(), build()
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Errorf("same inputs, digests %s and %s", da, db)
	}
	im, err := a.IndexManifest()
	if err != nil || len(im.Manifests) != 2 {
		t.Fatalf("index: %v, %v", im, err)
	}
	arm, err := a.Image(im.Manifests[1].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := arm.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Architecture != "arm64" || cfg.Config.User != "65532:65532" || cfg.Config.WorkingDir != OperatorHome ||
		cfg.Config.Entrypoint[0] != OperatorBinary || cfg.Config.Labels["org.opencontainers.image.version"] != "v0.0.0-test" {
		t.Errorf("config %+v", cfg.Config)
	}
	got := files(t, arm)
	for path, want := range map[string]string{
		"opt/helm/watches.yaml":                         "- group: charts.fleetmirror.dev\n",
		"opt/helm/helm-charts/spegel/Chart.yaml":        "name: spegel\n",
		"opt/helm/helm-charts/spegel/templates/ds.yaml": "kind: DaemonSet\n",
		"usr/local/bin/operator":                        "arm64 operator",
		"etc/passwd":                                    "",
	} {
		h, ok := got[path]
		if !ok {
			t.Errorf("%s missing from the image; has %v", path, keys(got))
			continue
		}
		if want != "" && h.content != want {
			t.Errorf("%s = %q, want %q", path, h.content, want)
		}
		if h.uid != 0 || !h.mtime.Equal(time.Unix(0, 0)) {
			t.Errorf("%s: uid %d mtime %v, want 0 and the epoch", path, h.uid, h.mtime)
		}
	}
	if !strings.Contains(got["etc/passwd"].content, "nonroot:x:65532:65532") {
		t.Errorf("/etc/passwd: %q", got["etc/passwd"].content)
	}
	if got["tmp/"].mode != 0o1777 {
		t.Errorf("/tmp mode %o, want 1777", got["tmp/"].mode)
	}
}

type fileInfo struct {
	content string
	uid     int
	mode    int64
	mtime   time.Time
}

func files(t *testing.T, img v1.Image) map[string]fileInfo {
	out := map[string]fileInfo{}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(tr)
			out[h.Name] = fileInfo{content: string(b), uid: h.Uid, mode: h.Mode, mtime: h.ModTime}
		}
		rc.Close()
	}
	return out
}

func keys(m map[string]fileInfo) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	return k
}

// mustManifest is the digest of the index's first (linux/amd64) image.
func mustManifest(t *testing.T, idx v1.ImageIndex) v1.Hash {
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) == 0 {
		t.Fatalf("index manifest: %v", err)
	}
	return im.Manifests[0].Digest
}
