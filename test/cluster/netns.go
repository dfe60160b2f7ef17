package cluster

import (
	"context"
	cryptorand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Every run gets a 6-hex-digit id; all kernel objects it creates are named
// "fm-<id>-..." so two runs (or a test and a demo) never collide and a later
// run can find and remove what a crashed one left behind.
//
//	bridge     fm-<id>-br   (host namespace, holds .1 so the subnet is on-link)
//	namespaces fm-<id>-up   (upstream registry, .2), fm-<id>-n1.. (nodes, .11..)
//	veths      fm-<id>-vu / fm-<id>-vup, fm-<id>-v1 / fm-<id>-v1p, ...
const (
	namePrefix = "fm-"
	// runStateDir records the owner pid of every live run, for leftover cleanup.
	runStateDir = "/run/fleetmirror-harness"
)

func newRunID() string {
	var b [3]byte
	if _, err := cryptorand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

// runState is what a run leaves in runStateDir while it is alive.
type runState struct {
	ID        string `json:"id"`
	PID       int    `json:"pid"`
	Subnet    string `json:"subnet"`
	Dir       string `json:"dir,omitempty"`
	RemoveDir bool   `json:"removeDir,omitempty"`
	SockDir   string `json:"sockDir,omitempty"`
}

func stateFile(id string) string { return filepath.Join(runStateDir, id+".json") }

func writeRunState(s runState) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(stateFile(s.ID), b, 0o644)
}

// run runs a command and returns its error with the command's output, which
// is where ip(8) says what went wrong.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func output(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// lockNet serialises subnet choice and bridge creation between runs on one
// machine, so two runs starting together cannot pick the same subnet.
func lockNet() (unlock func(), err error) {
	if err := os.MkdirAll(runStateDir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(runStateDir, "net.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
}

// hostPrefixes lists every destination the host namespace routes, in all
// tables, plus its own addresses: a test subnet must overlap none of them.
func hostPrefixes(ctx context.Context) ([]netip.Prefix, error) {
	out, err := output(ctx, "ip", "-4", "route", "show", "table", "all")
	if err != nil {
		return nil, err
	}
	addrs, err := output(ctx, "ip", "-4", "-o", "addr", "show")
	if err != nil {
		return nil, err
	}
	var ps []netip.Prefix
	routeTypes := map[string]bool{"local": true, "broadcast": true, "unicast": true, "multicast": true,
		"anycast": true, "blackhole": true, "unreachable": true, "prohibit": true, "throw": true, "nat": true}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && routeTypes[f[0]] {
			f = f[1:]
		}
		// The default route is not on-link; it overlaps everything by design.
		if len(f) == 0 || f[0] == "default" {
			continue
		}
		if p, ok := parsePrefix(f[0]); ok {
			ps = append(ps, p)
		}
	}
	for _, line := range strings.Split(addrs, "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "inet" {
				if p, ok := parsePrefix(f[i+1]); ok {
					ps = append(ps, p.Masked())
				}
			}
		}
	}
	return ps, nil
}

func parsePrefix(s string) (netip.Prefix, bool) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), true
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), true
	}
	return netip.Prefix{}, false
}

// pickSubnet chooses a random 10.x.y.0/24 (x in 200..249) that overlaps no
// route or address of the host. Must be called under lockNet.
func pickSubnet(ctx context.Context) (netip.Prefix, error) {
	used, err := hostPrefixes(ctx)
	if err != nil {
		return netip.Prefix{}, err
	}
	for range 200 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + rand.IntN(50)), byte(rand.IntN(256)), 0}), 24)
		free := true
		for _, u := range used {
			if u.Overlaps(p) {
				free = false
				break
			}
		}
		if free {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free 10.200-249.x.0/24 subnet: the host routes all of them")
}

// hostAddr returns the address with the given last octet in a /24.
func hostAddr(p netip.Prefix, last byte) netip.Addr {
	a := p.Addr().As4()
	a[3] = last
	return netip.AddrFrom4(a)
}

// netHost is one network namespace attached to the run's bridge.
type netHost struct {
	NS       string
	IP       netip.Addr
	hostVeth string
}

func createBridge(ctx context.Context, br string, subnet netip.Prefix) error {
	if err := run(ctx, "ip", "link", "add", br, "type", "bridge"); err != nil {
		return err
	}
	gw := netip.PrefixFrom(hostAddr(subnet, 1), subnet.Bits())
	if err := run(ctx, "ip", "addr", "add", gw.String(), "dev", br); err != nil {
		return err
	}
	return run(ctx, "ip", "link", "set", br, "up")
}

// createNetHost makes namespace ns with loopback up and a veth on the bridge
// holding ip. There is deliberately no default route inside: anything not on
// the test subnet or loopback is unreachable from a node.
func createNetHost(ctx context.Context, br, ns, veth string, ip netip.Addr, bits int) (*netHost, error) {
	if err := run(ctx, "ip", "netns", "add", ns); err != nil {
		return nil, err
	}
	h := &netHost{NS: ns, IP: ip}
	peer := veth + "p"
	if err := run(ctx, "ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns); err != nil {
		return h, err
	}
	h.hostVeth = veth
	steps := [][]string{
		{"link", "set", veth, "master", br},
		{"link", "set", veth, "up"},
		{"-n", ns, "addr", "add", netip.PrefixFrom(ip, bits).String(), "dev", peer},
		{"-n", ns, "link", "set", peer, "up"},
		{"-n", ns, "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if err := run(ctx, "ip", s...); err != nil {
			return h, err
		}
	}
	return h, nil
}

// nsPath is what nsenter --net= and setns(2) take.
func nsPath(ns string) string { return "/var/run/netns/" + ns }

// killNamespacePids SIGKILLs whatever still runs in ns (a containerd or agent
// of a crashed run), so the namespace can really go away.
func killNamespacePids(ctx context.Context, ns string) {
	out, err := output(ctx, "ip", "netns", "pids", ns)
	if err != nil {
		return
	}
	for _, f := range strings.Fields(out) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// removeRunObjects deletes every namespace and link named for run id. Veths
// are deleted explicitly because `ip netns del` can leave them for minutes.
func removeRunObjects(ctx context.Context, id string) error {
	prefix := namePrefix + id + "-"
	var errs []error
	nsOut, _ := output(ctx, "ip", "netns", "list")
	var nss []string
	for _, line := range strings.Split(nsOut, "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			nss = append(nss, f[0])
		}
	}
	for _, ns := range nss {
		killNamespacePids(ctx, ns)
	}
	links, _ := output(ctx, "ip", "-o", "link", "show")
	for _, line := range strings.Split(links, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, prefix) && !strings.HasSuffix(name, "-br") {
			if err := run(ctx, "ip", "link", "del", name); err != nil && linkExists(ctx, name) {
				errs = append(errs, err)
			}
		}
	}
	for _, ns := range nss {
		if err := run(ctx, "ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	br := prefix + "br"
	if linkExists(ctx, br) {
		if err := run(ctx, "ip", "link", "del", br); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func linkExists(ctx context.Context, name string) bool {
	return exec.CommandContext(ctx, "ip", "link", "show", "dev", name).Run() == nil
}

func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// CleanupLeftovers removes namespaces, links, socket dirs and temp dirs of
// earlier runs whose owner process is gone. Start calls it; it never touches
// a run whose owner is alive.
func CleanupLeftovers(ctx context.Context, logf func(string, ...any)) {
	entries, err := os.ReadDir(runStateDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(runStateDir, e.Name()))
		if err != nil {
			continue
		}
		var s runState
		if json.Unmarshal(b, &s) != nil || s.ID == "" || pidAlive(s.PID) {
			continue
		}
		logf("cluster: removing leftovers of run %s (owner pid %d is gone)", s.ID, s.PID)
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := removeRunLeftovers(s.ID, s.Dir, s.SockDir); err != nil {
			logf("cluster: leftovers of run %s: %v", s.ID, err)
		}
		if err := removeRunObjects(cctx, s.ID); err != nil {
			logf("cluster: leftovers of run %s: %v", s.ID, err)
		}
		cancel()
		if s.SockDir != "" {
			_ = os.RemoveAll(s.SockDir)
		}
		if s.RemoveDir && s.Dir != "" {
			_ = os.RemoveAll(s.Dir)
		}
		_ = os.Remove(filepath.Join(runStateDir, e.Name()))
	}
}
