package kube

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// No image comes from outside: the sandbox image and the smallest workload
// are both the sleeper command (test/kube/sleeper) built here.

// SandboxImage is the CRI sandbox image every node's containerd is
// configured with. It is imported into each node before kubelet starts, so
// it is never pulled; its name is the upstream's loopback alias (see
// cluster.Upstream.AltHost), which also holds it, so a pull could not leave
// the node either.
const SandboxImage = "127.0.0.1:5001/fleetmirror/sandbox:v1"

// SleeperRepo is where Start pushes the sleeper as a workload image, in the
// upstream ("<upstream>/"+SleeperRepo).
const SleeperRepo = "fleetmirror/sleeper:v1"

// buildSleeper compiles test/kube/sleeper statically into dir.
func buildSleeper(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "sleeper")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "github.com/fleetmirror/fleetmirror/test/kube/sleeper")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-buildvcs=false")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the sleeper (go build ./test/kube/sleeper): %w: %s", err, b)
	}
	return out, nil
}

// sleeperImage is an OCI image of one layer holding bin as /sleeper, the
// entrypoint; args become its Cmd, so images with different args share the
// layer but not the digest.
func sleeperImage(bin string, args ...string) (v1.Image, error) {
	b, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	// A fixed mtime keeps the layer digest the same across builds of the
	// same binary.
	hdr := &tar.Header{Name: "sleeper", Mode: 0o755, Size: int64(len(b)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(b); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layerBytes := tb.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, layer); err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Entrypoint = []string{"/sleeper"}
	cf.Config.Cmd = args
	return mutate.ConfigFile(img, cf)
}

// importImage loads img as ref into the containerd at socket, namespace
// k8s.io (where CRI looks), unpacked for overlayfs as a pull would leave it.
func importImage(ctx context.Context, socket, ref string, img v1.Image) error {
	tag, err := name.NewTag(ref, name.Insecure)
	if err != nil {
		return err
	}
	var archive bytes.Buffer
	if err := tarball.Write(tag, img, &archive); err != nil {
		return err
	}
	client, err := containerd.New(socket, containerd.WithDefaultNamespace("k8s.io"))
	if err != nil {
		return err
	}
	defer client.Close()
	imgs, err := client.Import(ctx, &archive)
	if err != nil {
		return fmt.Errorf("import %s: %w", ref, err)
	}
	for _, i := range imgs {
		if err := containerd.NewImage(client, i).Unpack(ctx, "overlayfs"); err != nil {
			return fmt.Errorf("unpack %s: %w", i.Name, err)
		}
	}
	return nil
}
