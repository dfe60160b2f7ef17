package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// What test/kube needs beyond containerd and the upstream: containerd that
// can run pods, more hosts on the subnet, daemons in namespaces, cgroup
// roots for kubelets, and removal of the mounts and cgroups pods leave.

// PodRuntime makes every node's containerd able to run pods for a kubelet.
type PodRuntime struct {
	// SandboxImage is CRI's sandbox ("pause") image. It is never pulled: the
	// caller imports it into each node (namespace k8s.io) before pods start.
	SandboxImage string
	// ShimDir holds containerd-shim-runc-v2 for containerd 2.x; it goes
	// first in containerd's PATH (1.6 keeps Debian's own shim).
	ShimDir string
	// CNIBinDir holds the CNI plugins; each node's CNI config dir stays its
	// own (Node.CNIConfDir).
	CNIBinDir string
	// Runc is the runc binary; default /usr/sbin/runc (Debian's).
	Runc string
}

func (p *PodRuntime) check() error {
	if p.SandboxImage == "" {
		return errors.New("cluster: PodRuntime.SandboxImage is empty: name the imported sandbox image")
	}
	if p.Runc == "" {
		p.Runc = "/usr/sbin/runc"
	}
	for what, path := range map[string]string{"runc": p.Runc, "ShimDir": p.ShimDir, "CNIBinDir": p.CNIBinDir} {
		if path == "" {
			return fmt.Errorf("cluster: PodRuntime.%s is empty", what)
		}
		if _, err := os.Stat(path); err != nil {
			return fmt.Errorf("cluster: PodRuntime %s: %w (run `make tools`)", what, err)
		}
	}
	return nil
}

// Process is a daemon started with StartProcess.
type Process struct{ p *proc }

// StartProcess runs bin with args in the run's namespace ns (see AddHost and
// Node.NS), output appended to logPath, env added to this process's
// environment. It dies with the test process.
func StartProcess(ns, logPath string, env []string, bin string, args ...string) (*Process, error) {
	p, err := startInNetns(ns, logPath, env, bin, args...)
	if err != nil {
		return nil, err
	}
	return &Process{p}, nil
}

// Pid is the daemon's pid.
func (p *Process) Pid() int { return p.p.pid() }

// Done is closed when the daemon has exited.
func (p *Process) Done() <-chan struct{} { return p.p.done }

// Exited reports whether the daemon has exited, and how.
func (p *Process) Exited() (bool, error) {
	if !p.p.exited() {
		return false, nil
	}
	return true, p.p.err
}

// Stop sends SIGTERM and SIGKILLs after grace.
func (p *Process) Stop(grace time.Duration) error { return p.p.stop(syscall.SIGTERM, grace) }

// AddHost adds namespace fm-<id>-<suffix> on the subnet with address
// .<last> (1, 2 and 11.. are taken). Close removes it with the rest.
func (c *Cluster) AddHost(ctx context.Context, suffix string, last byte) (ns string, ip netip.Addr, err error) {
	if last < 3 || last > 10 {
		return "", netip.Addr{}, fmt.Errorf("cluster: AddHost: last octet %d: use 3..10", last)
	}
	h, err := createNetHost(ctx, c.Bridge, c.nsName(suffix), c.nsName("v"+suffix), hostAddr(c.Subnet, last), c.Subnet.Bits())
	if err != nil {
		return "", netip.Addr{}, err
	}
	return h.NS, h.IP, nil
}

const cgroupV1Dir = "/sys/fs/cgroup"

// cgroupHierarchies lists the mount points of the machine's v1 cgroup
// hierarchies (cpu, memory, ..., name=systemd) and, with v2, of the v2 one
// (hybrid machines mount it at /sys/fs/cgroup/unified; runc uses it too).
func cgroupHierarchies(v2 bool) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var dirs []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		// "... mountpoint opts - fstype source superopts"
		pre, post, ok := strings.Cut(s.Text(), " - ")
		fields, postf := strings.Fields(pre), strings.Fields(post)
		if ok && len(fields) > 4 && len(postf) > 0 && (postf[0] == "cgroup" || v2 && postf[0] == "cgroup2") && strings.HasPrefix(fields[4], cgroupV1Dir+"/") {
			dirs = append(dirs, fields[4])
		}
	}
	return dirs, s.Err()
}

// MakeCgroup creates cgroup /fm-<id>-<name> in every v1 hierarchy, as a
// kubelet's cgroupRoot must exist in all of them, and returns "/fm-<id>-<name>".
// Only cgroup v1 (what these machines have) is handled. Close removes it,
// killing what still runs inside.
func (c *Cluster) MakeCgroup(name string) (string, error) {
	dirs, err := cgroupHierarchies(false)
	if err != nil {
		return "", err
	}
	if len(dirs) == 0 {
		return "", errors.New("cluster: no cgroup v1 hierarchies under /sys/fs/cgroup: MakeCgroup handles cgroup v1 only")
	}
	rel := "/" + c.nsName(name)
	for _, d := range dirs {
		p := filepath.Join(d, rel)
		if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", err
		}
		// A new cpuset cgroup has no CPUs or memory nodes until given some.
		if filepath.Base(d) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(d, f))
				if err != nil {
					return "", err
				}
				if err := os.WriteFile(filepath.Join(p, f), b, 0o644); err != nil {
					return "", fmt.Errorf("cgroup %s: %w", p, err)
				}
			}
		}
	}
	return rel, nil
}

// removeRunCgroups kills every process in the run's cgroups (pods whose
// network namespace is not a node's) and removes the trees deepest first.
func removeRunCgroups(id string) error {
	dirs, err := cgroupHierarchies(true)
	if err != nil {
		return err
	}
	var trees []string
	for _, d := range dirs {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			if e.IsDir() && strings.HasPrefix(e.Name(), namePrefix+id+"-") {
				trees = append(trees, filepath.Join(d, e.Name()))
			}
		}
	}
	if len(trees) == 0 {
		return nil
	}
	var all []string
	for _, t := range trees {
		_ = filepath.WalkDir(t, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				all = append(all, p)
			}
			return nil
		})
	}
	// Deepest first, so every directory is empty when its turn comes.
	slices.SortFunc(all, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	deadline := time.Now().Add(20 * time.Second)
	for {
		alive := 0
		for _, p := range all {
			b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
					_ = syscall.Kill(pid, syscall.SIGKILL)
					alive++
				}
			}
		}
		if alive == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var errs []error
	for _, p := range all {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			// A cgroup is busy for a moment after its last process died.
			time.Sleep(200 * time.Millisecond)
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// unmountUnder detaches every mount at or below the given dirs, deepest
// first: kubelet bind-mounts its root and pod volumes, containerd mounts
// rootfs overlays, shm and pod network namespaces.
func unmountUnder(dirs ...string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		for _, d := range dirs {
			if d != "" && (mp == d || strings.HasPrefix(mp, strings.TrimSuffix(d, "/")+"/")) {
				mps = append(mps, mp)
				break
			}
		}
	}
	slices.SortFunc(mps, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	var errs []error
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cniResultsDir is libcni's machine-wide cache of attachments, which
// containerd does not let a node move.
const cniResultsDir = "/var/lib/cni/results"

// CNINetworkName is the name a run's CNI network config must have so
// that Close can remove the run's entries from libcni's cache.
func (c *Cluster) CNINetworkName() string { return namePrefix + c.ID }

// removeCNIResults deletes the cache entries of the run's CNI network
// ("fm-<id>-<sandbox>-<ifname>") and the loopback entries of the same
// sandboxes, which the pods' teardown would have removed had it run.
func removeCNIResults(id string) error {
	entries, err := os.ReadDir(cniResultsDir)
	if err != nil {
		return nil // no CNI ever ran here
	}
	prefix := namePrefix + id + "-"
	var errs []error
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok {
			continue
		}
		sandbox, _, _ := strings.Cut(rest, "-")
		for _, f := range []string{e.Name(), "cni-loopback-" + sandbox + "-lo"} {
			if err := os.Remove(filepath.Join(cniResultsDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// removeRunLeftovers is what Close and CleanupLeftovers do beyond
// namespaces and links: pods' processes, cgroups, mounts and CNI cache.
func removeRunLeftovers(id string, dirs ...string) error {
	return errors.Join(removeRunCgroups(id), unmountUnder(dirs...), removeCNIResults(id))
}
