// Package cluster runs fleetmirror's end-to-end test bed on one machine:
// nodes in network namespaces on a private bridge, each with its own real
// containerd (2.4.2 or Debian's 1.6) and optionally its own agent, plus a
// real upstream registry in a namespace of its own.
//
// Network rule: all traffic stays on loopback or on the run's own subnet.
// The host holds .1 on the bridge so the subnet is on-link from the host;
// the namespaces have no default route, so nothing inside can reach beyond.
// Use IPs everywhere: no name is ever resolved.
package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Options configures Start.
type Options struct {
	Nodes      int    // >= 1
	Containerd string // "2" (default, containerd 2.4.2 from the tools dir) or "1.6" (Debian's)
	AgentBin   string // built agent binary; empty: agents are not started
	AgentArgs  []string
	// MirroredRegistries goes to --mirrored-registries; default: Upstream.URL().
	MirroredRegistries []string
	Dir                string // work dir; default a temp dir removed by Close
	KeepDir            bool   // keep a temp Dir after Close, to read logs
	Logf               func(format string, args ...any)
	// UpstreamRate shapes everything the upstream sends with one token
	// bucket shared by all connections (bytes/s, 0 = unshaped).
	UpstreamRate int64
	// UpstreamLatency is added before every upstream response.
	UpstreamLatency time.Duration
	// Pods, when set, makes every containerd able to run pods (test/kube).
	Pods *PodRuntime
	// PrivateMounts gives every node a mount namespace of its own in which
	// the node's dirs sit at /etc/containerd, /var/lib/containerd,
	// /run/containerd, /var/lib/fleetmirror and /run/dbus, and containerd
	// reads /etc/containerd/config.toml, so that hostPath volumes of pods
	// (test/kube) reach the node's files, never the machine's. See mounts.go.
	PrivateMounts bool
	// MirrorAlt mirrors the upstream's second name (Upstream.AltHost) too.
	MirrorAlt bool
	// OpenNetwork starts the agents without a network key, as agents
	// before membership ran: any process may join and read. By default
	// the agents share a key the cluster writes to KeyFile.
	OpenNetwork bool
	// Unprepared writes containerd 2.x configs the way many managed node
	// images ship them: no registry config_path (2.x then reads
	// /etc/containerd/certs.d, so the upstream still works) and
	// discard_unpacked_layers = true, so that the product's containerd-prep
	// has something to patch. Needs PrivateMounts (the default certs.d
	// path must be the node's own) and containerd 2.x.
	Unprepared bool
}

// Cluster is a running test bed. Close removes all of it.
type Cluster struct {
	ID       string // run id in every kernel object's name
	Nodes    []*Node
	Upstream *Upstream
	Subnet   netip.Prefix
	Dir      string
	Bridge   string
	// KeyFile holds the agents' shared network key; "" with OpenNetwork.
	KeyFile string

	opts      Options
	logf      func(string, ...any)
	mirrored  []string
	sockDir   string
	removeDir bool

	closeMu sync.Mutex
	closed  bool
}

// Start builds the test bed: bridge, upstream, nodes with containerd, and
// agents when Options.AgentBin is set. On error everything made so far is
// removed again.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	if opts.Nodes < 1 {
		return nil, fmt.Errorf("cluster: Nodes must be >= 1, got %d", opts.Nodes)
	}
	if opts.Nodes > 200 {
		return nil, fmt.Errorf("cluster: at most 200 nodes fit the /24, got %d", opts.Nodes)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("cluster: needs root (network namespaces, containerd)")
	}
	if opts.Containerd == "" {
		opts.Containerd = Containerd2
	}
	bin, err := ContainerdBinary(opts.Containerd)
	if err != nil {
		return nil, err
	}
	if opts.Unprepared && (!opts.PrivateMounts || opts.Containerd != Containerd2) {
		return nil, errors.New("cluster: Unprepared needs PrivateMounts and containerd 2.x: only then is containerd's default certs.d the node's own")
	}
	if opts.Pods != nil {
		if err := opts.Pods.check(); err != nil {
			return nil, err
		}
	}
	if opts.AgentBin != "" {
		if opts.AgentBin, err = filepath.Abs(opts.AgentBin); err != nil {
			return nil, err
		}
		if _, err := os.Stat(opts.AgentBin); err != nil {
			return nil, fmt.Errorf("cluster: agent binary: %w", err)
		}
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(format string, args ...any) { slog.Info(fmt.Sprintf(format, args...)) }
	}
	CleanupLeftovers(ctx, logf)

	c = &Cluster{ID: newRunID(), opts: opts, logf: logf}
	c.Bridge = namePrefix + c.ID + "-br"
	// Sockets live under /run so their paths stay far below the ~108 byte
	// limit of unix socket addresses whatever Dir is.
	c.sockDir = "/run/fm-" + c.ID
	defer func() {
		if err != nil {
			if cerr := c.Close(); cerr != nil {
				logf("cluster: cleanup after failed start: %v", cerr)
			}
			c = nil
		}
	}()
	if opts.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "fmcluster-"+c.ID+"-"); err != nil {
			return c, err
		}
		c.removeDir = !opts.KeepDir
	} else {
		if c.Dir, err = filepath.Abs(opts.Dir); err != nil {
			return c, err
		}
		if err = os.MkdirAll(c.Dir, 0o755); err != nil {
			return c, err
		}
	}
	if err = os.MkdirAll(c.sockDir, 0o755); err != nil {
		return c, err
	}
	state := runState{ID: c.ID, PID: os.Getpid(), Dir: c.Dir, RemoveDir: c.removeDir, SockDir: c.sockDir}
	// Recorded before anything exists, so a crash at any point is cleanable.
	if err = os.MkdirAll(runStateDir, 0o755); err != nil {
		return c, err
	}
	if err = writeRunState(state); err != nil {
		return c, err
	}

	if !opts.OpenNetwork {
		c.KeyFile = filepath.Join(c.Dir, "network.key")
		if err = WriteNetworkKey(c.KeyFile); err != nil {
			return c, err
		}
	}
	if err = c.setupNetwork(ctx); err != nil {
		return c, err
	}
	state.Subnet = c.Subnet.String()
	_ = writeRunState(state)
	logf("cluster %s: subnet %s, bridge %s, dir %s", c.ID, c.Subnet, c.Bridge, c.Dir)

	up, err := createNetHost(ctx, c.Bridge, c.nsName("up"), c.nsName("vu"), hostAddr(c.Subnet, 2), c.Subnet.Bits())
	if err != nil {
		return c, err
	}
	c.Upstream = newUpstream(up.NS, up.IP, Options{Logf: logf, UpstreamRate: opts.UpstreamRate, UpstreamLatency: opts.UpstreamLatency})
	if err = c.Upstream.Start(); err != nil {
		return c, err
	}
	c.mirrored = opts.MirroredRegistries
	if len(c.mirrored) == 0 {
		c.mirrored = []string{c.Upstream.URL()}
	}
	if opts.MirrorAlt {
		c.mirrored = append(c.mirrored, "http://"+c.Upstream.AltHost())
	}

	for i := 1; i <= opts.Nodes; i++ {
		n, err := c.newNode(ctx, i, bin)
		if err != nil {
			return c, err
		}
		c.Nodes = append(c.Nodes, n)
	}
	if err = c.parallel(func(n *Node) error { return n.StartContainerd(ctx) }); err != nil {
		return c, err
	}
	if opts.AgentBin != "" {
		if err = c.StartAgents(ctx); err != nil {
			return c, err
		}
	}
	return c, nil
}

// WriteNetworkKey writes a new random network key to path, as the
// chart's Secret holds one: 64 hex characters.
func WriteNetworkKey(path string) error {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(hex.EncodeToString(b)+"\n"), 0o600)
}

func (c *Cluster) nsName(suffix string) string { return namePrefix + c.ID + "-" + suffix }

func (c *Cluster) setupNetwork(ctx context.Context) error {
	unlock, err := lockNet()
	if err != nil {
		return err
	}
	defer unlock()
	if c.Subnet, err = pickSubnet(ctx); err != nil {
		return err
	}
	return createBridge(ctx, c.Bridge, c.Subnet)
}

func (c *Cluster) newNode(ctx context.Context, i int, bin string) (*Node, error) {
	name := fmt.Sprintf("n%d", i)
	h, err := createNetHost(ctx, c.Bridge, c.nsName(name), c.nsName(fmt.Sprintf("v%d", i)), hostAddr(c.Subnet, byte(10+i)), c.Subnet.Bits())
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(c.Dir, name)
	run := filepath.Join(c.sockDir, name)
	n := &Node{
		Name:          name,
		NS:            h.NS,
		IP:            h.IP,
		Dir:           dir,
		CertsDir:      filepath.Join(dir, "certs.d"),
		Socket:        filepath.Join(run, "containerd.sock"),
		ContentDir:    filepath.Join(dir, "root", "io.containerd.content.v1.content"),
		ConfigPath:    filepath.Join(dir, "containerd.toml"),
		ContainerdLog: filepath.Join(dir, "containerd.log"),
		AgentLog:      filepath.Join(dir, "agent.log"),
		CNIConfDir:    filepath.Join(dir, "cni", "net.d"),
		cluster:       c,
		link:          h.hostVeth + "p",
		containerdBin: bin,
		version:       c.opts.Containerd,
	}
	n.configArg = n.ConfigPath
	paths := containerdPaths{
		Root:    filepath.Join(dir, "root"),
		State:   filepath.Join(run, "state"),
		Socket:  n.Socket,
		Opt:     filepath.Join(dir, "opt"),
		Certs:   n.CertsDir,
		CNIConf: n.CNIConfDir,
		CNIBin:  filepath.Join(dir, "cni", "bin"),
		Pods:    c.opts.Pods,

		Unprepared: c.opts.Unprepared,
	}
	if p := c.opts.Pods; p != nil {
		paths.CNIBin = p.CNIBinDir
		if c.opts.Containerd != Containerd16 {
			n.containerdEnv = []string{"PATH=" + p.ShimDir + ":" + os.Getenv("PATH")}
		}
	}
	hostDirs := []string{paths.Root, paths.State, paths.Opt, paths.Certs, paths.CNIConf, paths.CNIBin}
	if c.opts.PrivateMounts {
		hostDirs = c.privateLayout(n, run, &paths)
	}
	for _, d := range hostDirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	cfg, err := containerdConfig(c.opts.Containerd, paths)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(n.ConfigPath, cfg, 0o644); err != nil {
		return nil, err
	}
	if c.opts.PrivateMounts {
		if err := c.makeMountNS(ctx, n); err != nil {
			return nil, err
		}
	}
	if err := c.Upstream.addAltClient(n.NS, n.IP); err != nil {
		return nil, err
	}
	// The upstream speaks plain HTTP; without this containerd would try
	// HTTPS for a non-localhost registry. This is the node's "own" registry
	// config that the agent later prepends its mirror to.
	if err := n.WriteHostsTOML(c.Upstream.Host(), UpstreamHostsTOML(c.Upstream)); err != nil {
		return nil, err
	}
	return n, nil
}

// AddNode adds one more node, as a node pool scaling up would: it starts
// its containerd and, with Options.AgentBin, its agent.
func (c *Cluster) AddNode(ctx context.Context) (*Node, error) {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closed {
		return nil, errors.New("cluster: AddNode after Close")
	}
	bin, err := ContainerdBinary(c.opts.Containerd)
	if err != nil {
		return nil, err
	}
	n, err := c.newNode(ctx, len(c.Nodes)+1, bin)
	if err != nil {
		return nil, err
	}
	// Listed before it runs, so Close stops whatever did start.
	c.Nodes = append(c.Nodes, n)
	if err := n.StartContainerd(ctx); err != nil {
		return n, err
	}
	if c.opts.AgentBin != "" {
		if err := n.StartAgent(ctx); err != nil {
			return n, err
		}
	}
	return n, nil
}

// UpstreamHostsTOML is the hosts.toml every node starts with: upstream only.
func UpstreamHostsTOML(u *Upstream) string {
	return fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", u.URL(), u.URL())
}

// parallel runs f for every node at once and joins the errors.
func (c *Cluster) parallel(f func(*Node) error) error {
	errs := make([]error, len(c.Nodes))
	var wg sync.WaitGroup
	for i, n := range c.Nodes {
		wg.Go(func() { errs[i] = f(n) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// StartAgents starts every node's agent at once (they bootstrap from each
// other) and waits until all are ready.
func (c *Cluster) StartAgents(ctx context.Context) error {
	return c.parallel(func(n *Node) error { return n.StartAgent(ctx) })
}

// StopAgents stops every agent gracefully.
func (c *Cluster) StopAgents() error {
	return c.parallel(func(n *Node) error { return n.StopAgent() })
}

// Node returns node i, 1-based like the names.
func (c *Cluster) Node(i int) *Node { return c.Nodes[i-1] }

// LogTail returns the last lines of every node's logs.
func (c *Cluster) LogTail(lines int) string {
	s := ""
	for _, n := range c.Nodes {
		s += n.LogTail(lines)
	}
	return s
}

// Close stops agents, containerds and the upstream, and removes the
// namespaces, veths, bridge, sockets and (if it made it) the work dir.
// Safe to call more than once.
func (c *Cluster) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	var errs []error
	if err := c.parallel(func(n *Node) error { return n.StopAgent() }); err != nil {
		errs = append(errs, fmt.Errorf("stop agents: %w", err))
	}
	if err := c.parallel(func(n *Node) error { return n.StopContainerd() }); err != nil {
		errs = append(errs, fmt.Errorf("stop containerd: %w", err))
	}
	if c.Upstream != nil {
		if err := c.Upstream.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("stop upstream: %w", err))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := removeRunLeftovers(c.ID, c.Dir, c.sockDir); err != nil {
		errs = append(errs, err)
	}
	if err := removeRunObjects(ctx, c.ID); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(c.sockDir); err != nil {
		errs = append(errs, err)
	}
	if c.removeDir && c.Dir != "" {
		if err := os.RemoveAll(c.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	_ = os.Remove(stateFile(c.ID))
	if len(errs) == 0 {
		c.logf("cluster %s: closed", c.ID)
	}
	return errors.Join(errs...)
}
