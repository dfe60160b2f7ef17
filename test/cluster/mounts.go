package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Options.PrivateMounts: nodes share the machine's filesystem, so a pod's
// hostPath /etc/containerd would be the machine's real one on every node.
// Instead each node gets one persistent mount namespace, a copy of the
// machine's (so every harness path still resolves) plus bind mounts of the
// node's own dirs at the standard paths. containerd and the kubelet (and so
// every pod's hostPath) run in it; the harness keeps the machine's view
// and reaches the same files through the node's dirs (Node.HostPath).
//
// The namespace is pinned by a bind mount of its nsfs file at
// <sockdir>/mntns/<node>; that dir is a private mount, as an nsfs file may
// not sit on a mount that propagates. Close and CleanupLeftovers unmount
// it with everything else under the socket dir; the namespace and its
// mounts go away with its last process.
//
// Mount points that the machine lacks (/var/lib/containerd,
// /var/lib/fleetmirror) are created on it as empty directories: a bind
// mount needs a directory to cover. Nothing is ever written into them.

// bind is one mount of a node's namespace: the harness's dir src appears
// at target inside the node.
type bind struct{ src, target string }

// privateLayout moves the node's containerd files to where the binds put
// them and points its config at the standard paths. It returns the host
// dirs to create.
func (c *Cluster) privateLayout(n *Node, run string, p *containerdPaths) []string {
	etc := filepath.Join(n.Dir, "etc", "containerd")
	lib := filepath.Join(n.Dir, "var", "lib", "containerd")
	fm := filepath.Join(n.Dir, "var", "lib", "fleetmirror")
	n.DBusDir = filepath.Join(c.sockDir, n.Name+"-dbus")
	n.binds = []bind{
		{etc, "/etc/containerd"},
		{lib, "/var/lib/containerd"},
		{run, "/run/containerd"},
		{fm, "/var/lib/fleetmirror"},
		{n.DBusDir, "/run/dbus"},
	}
	n.CertsDir = filepath.Join(etc, "certs.d")
	n.ConfigPath = filepath.Join(etc, "config.toml")
	n.ContentDir = filepath.Join(lib, "io.containerd.content.v1.content")
	n.configArg = "/etc/containerd/config.toml"
	// n.Socket stays run/containerd.sock: the same socket, as the harness
	// sees it.
	p.Root, p.State = "/var/lib/containerd", "/run/containerd"
	p.Socket = "/run/containerd/containerd.sock"
	p.Certs = "/etc/containerd/certs.d"
	return []string{etc, n.CertsDir, lib, run, fm, n.DBusDir, p.Opt, p.CNIConf, p.CNIBin}
}

// makeMountNS creates the node's mount namespace with its binds.
func (c *Cluster) makeMountNS(ctx context.Context, n *Node) error {
	dir := filepath.Join(c.sockDir, "mntns")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if !isMountPoint(dir) {
		if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", dir, err)
	}
	file := filepath.Join(dir, n.Name)
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		return err
	}
	// Inside the new namespace first drop its copies of other namespaces'
	// files (ours and other runs'): they would keep those namespaces alive
	// as long as this one.
	script := []string{"set -e",
		`awk '$5 ~ /^\/run\/fm-[0-9a-f]+\/mntns$/ {print $5}' /proc/self/mountinfo | while read -r m; do umount -l "$m"; done`}
	for _, b := range n.binds {
		if strings.ContainsAny(b.src+b.target, "'\n") {
			return fmt.Errorf("mount namespace of %s: path %q cannot go into a shell script", n.Name, b.src)
		}
		if err := os.MkdirAll(b.target, 0o755); err != nil {
			return fmt.Errorf("mount point %s: %w", b.target, err)
		}
		script = append(script, fmt.Sprintf("mount --bind '%s' '%s'", b.src, b.target))
	}
	// slave: netns files added and removed later on the machine (under the
	// shared /run/netns) show up here too; nothing mounted here leaks out.
	cmd := exec.CommandContext(ctx, "unshare", "--mount="+file, "--propagation", "slave", "sh", "-c", strings.Join(script, "\n"))
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = unix.Unmount(file, unix.MNT_DETACH)
		return fmt.Errorf("%s: mount namespace: unshare: %w: %s", n.Name, err, out)
	}
	n.MountNS = file
	return nil
}

// isMountPoint reports whether p is listed as a mount point of this
// process's namespace.
func isMountPoint(p string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && unescapeMount(f[4]) == p {
			return true
		}
	}
	return false
}

// HostPath maps a path as the node's containerd, kubelet and pods see it
// to where the harness finds the same file: with Options.PrivateMounts,
// /etc/containerd/certs.d/x is <node dir>/etc/containerd/certs.d/x. Paths
// outside the node's binds (and all paths without PrivateMounts) are the
// same in both views.
func (n *Node) HostPath(p string) string {
	p = filepath.Clean(p)
	for _, b := range n.binds {
		if p == b.target {
			return b.src
		}
		if rest, ok := strings.CutPrefix(p, b.target+"/"); ok {
			return filepath.Join(b.src, rest)
		}
	}
	return p
}

// StartProcess runs bin in the node's network namespace and, with
// Options.PrivateMounts, its mount namespace: how test/kube starts a
// kubelet that must see what the node's containerd sees.
func (n *Node) StartProcess(logPath string, env []string, bin string, args ...string) (*Process, error) {
	p, err := startInNamespaces(n.NS, n.MountNS, logPath, env, bin, args...)
	if err != nil {
		return nil, err
	}
	return &Process{p}, nil
}

// errNoMountNS is returned by what needs Options.PrivateMounts without it.
var errNoMountNS = errors.New("cluster: the node has no mount namespace of its own: set Options.PrivateMounts")

// InMountNS runs a command in the node's namespaces (network and mount)
// and returns its combined output, for tests that look at a node the way
// its pods do.
func (n *Node) InMountNS(ctx context.Context, name string, args ...string) (string, error) {
	if n.MountNS == "" {
		return "", errNoMountNS
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + nsPath(n.NS), "--mount=" + n.MountNS, "--", name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %s %v: %w: %s", n.Name, name, args, err, out)
	}
	return string(out), nil
}
