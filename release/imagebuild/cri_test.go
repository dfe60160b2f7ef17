package imagebuild

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// TestAgentImageThroughCRI pushes the built agent image to a registry,
// pulls it through containerd 2.x's CRI (the kubelet's call), mounts the
// unpacked image's snapshot with ctr and runs its entrypoint, chrooted
// into that root as the image's user, with `version`.
func TestAgentImageThroughCRI(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, containerd, mounts")
	}
	if _, err := cluster.ContainerdBinary(cluster.Containerd2); err != nil {
		t.Skip(err)
	}
	ctrBin := filepath.Join(cluster.ToolsDir(), "containerd-v2.4.2", "bin", "ctr")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	module := moduleRoot(t)
	o := testOptions(t, module)
	o.Version = "v0.0.0-cri"
	idx, err := Build(ctx, Specs(module)["agent"], o)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := idx.Digest()

	c, err := cluster.Start(ctx, cluster.Options{Nodes: 1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	n := c.Node(1)
	ref := c.Upstream.Host() + "/fleetmirror/agent:" + o.Version
	tag, err := name.NewTag(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(tag, idx, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Pull(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if got, err := n.ImageDigest(ctx, ref); err != nil || got.String() != want.String() {
		t.Errorf("containerd has %s (%v), pushed %s", got, err, want)
	}

	mnt := t.TempDir()
	ctr := func(args ...string) string {
		out, err := exec.CommandContext(ctx, ctrBin, append([]string{"--address", n.Socket, "--namespace", "k8s.io"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	ctr("images", "mount", "--snapshotter", "overlayfs", ref, mnt)
	defer ctr("images", "unmount", "--rm", mnt)

	img, err := idx.Image(mustManifest(t, idx))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Config.Entrypoint) == 0 {
		t.Fatal("the image has no entrypoint")
	}
	cmd := exec.CommandContext(ctx, cfg.Config.Entrypoint[0], append(cfg.Config.Entrypoint[1:], "version")...)
	cmd.Dir = "/"
	cmd.Env = cfg.Config.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: mnt, Credential: &syscall.Credential{Uid: NonRoot, Gid: NonRoot}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("run %v in the image: %v\n%s", cfg.Config.Entrypoint, err, out)
	}
	if got := strings.TrimSpace(string(out)); got != o.Version {
		t.Errorf("agent version in the image printed %q, want %q", got, o.Version)
	}
	t.Logf("pulled %s through the CRI; %s version printed %q", want, cfg.Config.Entrypoint[0], strings.TrimSpace(string(out)))
}
