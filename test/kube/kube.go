// Package kube runs a real multi-node Kubernetes cluster on one machine for
// fleetmirror's end-to-end tests and demo, on top of test/cluster.
//
// The control plane (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, Kubernetes 1.34.4 built from the Go module proxy by
// hack/tools.sh) runs in a network namespace of its own on the run's
// subnet. Each worker node is a test/cluster node (a network namespace with
// its own containerd, 2.4.2 by default, Debian's runc and a runc shim built
// from the module proxy) plus its own kubelet with its own root dir, cert
// dir, cgroup root and pod log dir. Pods get real networking from the CNI
// bridge plugin inside their node's namespace, or use hostNetwork.
//
// What does not exist, said plainly: no kube-proxy and no iptables, so
// ClusterIP and NodePort Services do not forward (use host networking, pod
// IPs or headless Services) with one exception: the "kubernetes" Service's
// ClusterIP reaches the API server (plain routing to an address the
// control plane namespace holds), so in-cluster clients work. Pod ranges
// are routed between nodes and from the control plane, as a cloud's VPC
// routes do. Cluster DNS is CoreDNS (see dns.go): Services, headless ones
// included, resolve; other names do not. The sandbox image is the sleeper
// built here and imported into every node: nothing is pulled from the
// internet. AddNode joins a node later, as a node pool scaling up does.
//
// Nodes share the machine's filesystem unless Options.PrivateMounts gives
// each its own mount namespace (test/cluster/mounts.go): then a pod's
// hostPath /etc/containerd, /var/lib/containerd, /run/containerd,
// /var/lib/fleetmirror or /run/dbus is its node's own (Node.HostPath says
// where the harness finds it), containerd reads /etc/containerd/config.toml
// there, and each node has a bus at /run/dbus/system_bus_socket whose
// stand-in systemd restarts that node's containerd (nodebus.go), so the
// product's DaemonSets can run unchanged without touching the machine.
//
// Everything is named for the run (fm-<id>-...) and removed by Close, or by
// the next run's leftover cleanup if this process dies.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// Options configures Start.
type Options struct {
	Nodes      int    // worker nodes, >= 1; default 3
	Containerd string // as cluster.Options.Containerd: "2" (default) or "1.6"
	Dir        string // work dir; default a temp dir removed by Close
	KeepDir    bool   // keep a temp Dir after Close, to read logs
	Logf       func(format string, args ...any)
	// PrivateMounts gives each node its own mount namespace, in which its
	// containerd and kubelet run and the node's dirs sit at
	// /etc/containerd, /var/lib/containerd, /run/containerd,
	// /var/lib/fleetmirror and /run/dbus (cluster.Options.PrivateMounts),
	// and its own system bus there (Buses). Off: nodes share the machine's
	// filesystem, so hostPath volumes reach the machine's real paths.
	PrivateMounts bool
	// Unprepared starts nodes whose containerd config lacks what
	// containerd-prep sets (cluster.Options.Unprepared); needs
	// PrivateMounts.
	Unprepared bool
}

// Cluster is a running Kubernetes cluster. The embedded test/cluster gives
// the nodes' containerds and the upstream registry. Close removes all of it.
type Cluster struct {
	*cluster.Cluster

	Server     string         // API server URL, reachable from the host and every node
	DNS        netip.AddrPort // cluster DNS (CoreDNS), the pods' nameserver
	Kubeconfig string         // admin (system:masters) kubeconfig file
	Config     *rest.Config
	Client     kubernetes.Interface
	Kubelets   []*Kubelet
	Buses      []*NodeBus // with Options.PrivateMounts, one per node
	// SleeperImage is the sleeper pushed to the upstream, for workloads.
	SleeperImage string
	// Timings of Start: "cluster" (namespaces, containerds, upstream),
	// "control-plane" (API server and DNS ready), "nodes" (all nodes Ready).
	Timings map[string]time.Duration

	logf       func(string, ...any)
	bins       binaries
	sandbox    v1.Image
	sleeper    v1.Image // the sleeper as a workload, for Workload
	private    bool
	pki        *pki
	cpNS       string
	cpIP       netip.Addr
	components []*component
	closeOnce  sync.Once
	closeErr   error
}

// Start brings up the cluster and waits until every node is Ready. On error
// everything made so far is removed again.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.Nodes < 1 {
		return nil, fmt.Errorf("kube: Nodes must be >= 1, got %d", opts.Nodes)
	}
	bins, err := findBinaries()
	if err != nil {
		return nil, err
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(format string, args ...any) { slog.Info(fmt.Sprintf(format, args...)) }
	}
	build, err := os.MkdirTemp("", "fmkube-build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(build)
	sleeperBin, err := buildSleeper(ctx, build)
	if err != nil {
		return nil, err
	}
	sandbox, err := sleeperImage(sleeperBin)
	if err != nil {
		return nil, err
	}
	workload, err := sleeperImage(sleeperBin, "workload")
	if err != nil {
		return nil, err
	}

	c = &Cluster{logf: logf, bins: bins, sandbox: sandbox, sleeper: workload, Timings: map[string]time.Duration{}}
	t0 := time.Now()
	c.Cluster, err = cluster.Start(ctx, cluster.Options{
		Nodes:         opts.Nodes,
		Containerd:    opts.Containerd,
		Dir:           opts.Dir,
		KeepDir:       opts.KeepDir,
		Logf:          logf,
		PrivateMounts: opts.PrivateMounts,
		Unprepared:    opts.Unprepared,
		Pods: &cluster.PodRuntime{
			SandboxImage: SandboxImage,
			ShimDir:      bins.shimDir,
			CNIBinDir:    bins.cniDir,
		},
	})
	if err != nil {
		return nil, err
	}
	c.Timings["cluster"] = time.Since(t0)
	defer func() {
		if err != nil {
			if cerr := c.Close(); cerr != nil {
				logf("kube: cleanup after failed start: %v", cerr)
			}
			c = nil
		}
	}()

	// The images go to the upstream first: the sandbox under its alias's
	// name, so even a pull of it would be served locally.
	if err = c.Upstream.Push(ctx, strings.TrimPrefix(SandboxImage, c.Upstream.AltHost()+"/"), sandbox); err != nil {
		return c, err
	}
	c.SleeperImage = c.Upstream.Ref(SleeperRepo)
	if err = c.Upstream.Push(ctx, c.SleeperImage, workload); err != nil {
		return c, err
	}
	if err = c.parallel(func(n *cluster.Node) error { return importImage(ctx, n.Socket, SandboxImage, sandbox) }); err != nil {
		return c, err
	}

	if opts.PrivateMounts {
		for _, n := range c.Nodes {
			b, err := c.startBus(ctx, n)
			if err != nil {
				return c, err
			}
			c.Buses = append(c.Buses, b)
		}
	}
	c.private = opts.PrivateMounts

	t1 := time.Now()
	ns, ip, err := c.AddHost(ctx, "cp", 3)
	if err != nil {
		return c, err
	}
	c.cpNS, c.cpIP = ns, ip
	if err = c.startControlPlane(ctx, ns, ip); err != nil {
		return c, err
	}
	if c.Config, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return c, err
	}
	c.Config.QPS, c.Config.Burst = 50, 100
	if c.Client, err = kubernetes.NewForConfig(c.Config); err != nil {
		return c, err
	}
	if err = c.startDNS(ctx); err != nil {
		return c, err
	}
	c.Timings["control-plane"] = time.Since(t1)

	t2 := time.Now()
	for i, n := range c.Nodes {
		k, err := c.startKubelet(ctx, i+1, n)
		if err != nil {
			return c, err
		}
		c.Kubelets = append(c.Kubelets, k)
	}
	if err = c.WaitNodesReady(ctx, 2*time.Minute); err != nil {
		return c, err
	}
	c.Timings["nodes"] = time.Since(t2)
	logf("kube %s: %d nodes Ready; API server %s; kubeconfig %s (cluster %v, control plane %v, nodes %v)",
		c.ID, len(c.Nodes), c.Server, c.Kubeconfig, c.Timings["cluster"].Round(time.Millisecond),
		c.Timings["control-plane"].Round(time.Millisecond), c.Timings["nodes"].Round(time.Millisecond))
	return c, nil
}

// Workload is a runnable image of about size bytes: the sleeper's layer
// (entrypoint /sleeper) plus layers of seeded random bytes
// (cluster.Image), so a different seed gives layers no node holds yet.
func (c *Cluster) Workload(seed, size int64, layers int) (v1.Image, error) {
	random, err := cluster.Image(seed, size, layers)
	if err != nil {
		return nil, err
	}
	ls, err := random.Layers()
	if err != nil {
		return nil, err
	}
	return mutate.AppendLayers(c.sleeper, ls...)
}

// NodeOptions says how a node joins (AddNodeWith).
type NodeOptions struct {
	// Taints the kubelet registers the node with (--register-with-taints),
	// as node pools register with a startup taint.
	Taints []corev1.Taint
	// Prepare runs once the node's containerd runs and before its kubelet
	// starts, as a node image's own setup would: nothing of the cluster
	// has seen the node yet.
	Prepare func(context.Context, *cluster.Node) error
}

// AddNode joins one more worker node, as a node pool scaling up would:
// namespace, containerd with the sandbox image, its bus with PrivateMounts,
// kubelet; it returns once the node is Ready.
func (c *Cluster) AddNode(ctx context.Context) (*Kubelet, error) {
	return c.AddNodeWith(ctx, NodeOptions{})
}

// AddNodeWith is AddNode with the node's own setup and taints.
func (c *Cluster) AddNodeWith(ctx context.Context, o NodeOptions) (*Kubelet, error) {
	t0 := time.Now()
	n, err := c.Cluster.AddNode(ctx)
	if err != nil {
		return nil, err
	}
	if err := importImage(ctx, n.Socket, SandboxImage, c.sandbox); err != nil {
		return nil, err
	}
	if c.private {
		b, err := c.startBus(ctx, n)
		if err != nil {
			return nil, err
		}
		c.Buses = append(c.Buses, b)
	}
	if o.Prepare != nil {
		if err := o.Prepare(ctx, n); err != nil {
			return nil, fmt.Errorf("kube: preparing %s: %w", n.Name, err)
		}
	}
	var args []string
	if len(o.Taints) > 0 {
		var ts []string
		for _, t := range o.Taints {
			ts = append(ts, t.Key+"="+t.Value+":"+string(t.Effect))
		}
		args = append(args, "--register-with-taints="+strings.Join(ts, ","))
	}
	k, err := c.startKubelet(ctx, len(c.Nodes), n, args...)
	if err != nil {
		return nil, err
	}
	c.Kubelets = append(c.Kubelets, k)
	if err := c.WaitNodesReady(ctx, 2*time.Minute); err != nil {
		return k, err
	}
	c.logf("kube %s: %s joined, Ready in %v", c.ID, n.Name, time.Since(t0).Round(time.Millisecond))
	return k, nil
}

func (c *Cluster) parallel(f func(*cluster.Node) error) error {
	errs := make([]error, len(c.Nodes))
	var wg sync.WaitGroup
	for i, n := range c.Nodes {
		wg.Go(func() { errs[i] = f(n) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Healthy returns the first control plane daemon or kubelet that has died.
func (c *Cluster) Healthy() error {
	if err := c.checkComponents(); err != nil {
		return err
	}
	for _, k := range c.Kubelets {
		if err := k.exited(); err != nil {
			return err
		}
	}
	for _, b := range c.Buses {
		if done, err := b.proc.Exited(); done {
			return fmt.Errorf("kube: %s: dbus-daemon exited (%v); log tail:\n%s", b.Node.Name, err, cluster.TailFile(b.Log, 20))
		}
	}
	return nil
}

// WaitNodesReady waits until every node is registered and Ready.
func (c *Cluster) WaitNodesReady(ctx context.Context, timeout time.Duration) error {
	return c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		nodes, err := c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		ready := 0
		var status []string
		for _, n := range nodes.Items {
			for _, cond := range n.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					status = append(status, fmt.Sprintf("%s %s (%s)", n.Name, cond.Status, cond.Message))
					if cond.Status == corev1.ConditionTrue {
						ready++
					}
				}
			}
		}
		return ready == len(c.Nodes), fmt.Sprintf("%d/%d nodes Ready: %s", ready, len(c.Nodes), strings.Join(status, "; ")), nil
	})
}

// Poll calls cond every 500ms until it is done, it errs, a daemon dies or
// timeout passes; the last status cond gave goes into the timeout error.
func (c *Cluster) Poll(ctx context.Context, timeout time.Duration, cond func(context.Context) (done bool, status string, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := ""
	for {
		if err := c.Healthy(); err != nil {
			return err
		}
		done, status, err := cond(ctx)
		if err != nil || done {
			return err
		}
		last = status
		select {
		case <-ctx.Done():
			return fmt.Errorf("kube: not done after %v: %s", timeout, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// LogTail returns the last lines of every daemon's log, for failures.
func (c *Cluster) LogTail(lines int) string {
	var b strings.Builder
	for _, comp := range c.components {
		fmt.Fprintf(&b, "--- %s\n%s", comp.name, cluster.TailFile(comp.log, lines))
	}
	for _, k := range c.Kubelets {
		fmt.Fprintf(&b, "--- %s kubelet\n%s", k.Name, cluster.TailFile(k.Log, lines))
		fmt.Fprintf(&b, "--- %s containerd\n%s", k.Name, cluster.TailFile(k.Node.ContainerdLog, lines))
	}
	for _, bus := range c.Buses {
		fmt.Fprintf(&b, "--- %s dbus-daemon\n%s", bus.Node.Name, cluster.TailFile(bus.Log, lines))
	}
	return b.String()
}

// Close stops the kubelets, then the control plane, then removes the
// nodes, pods, mounts, cgroups, namespaces and the work dir (test/cluster's
// Close). Safe to call more than once.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		errs := make([]error, len(c.Kubelets))
		var wg sync.WaitGroup
		for i, k := range c.Kubelets {
			wg.Go(func() {
				if err := k.sup.stop(10 * time.Second); err != nil {
					errs[i] = fmt.Errorf("%s kubelet: %w", k.Name, err)
				}
			})
		}
		wg.Wait()
		for _, b := range c.Buses {
			if err := b.close(); err != nil {
				errs = append(errs, fmt.Errorf("%s bus: %w", b.Node.Name, err))
			}
		}
		// Reverse start order: the scheduler and controllers before the
		// API server, the API server before etcd.
		for i := len(c.components) - 1; i >= 0; i-- {
			if err := c.components[i].proc.Stop(10 * time.Second); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.components[i].name, err))
			}
		}
		if c.Cluster != nil {
			errs = append(errs, c.Cluster.Close())
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// Memory sums the resident memory of every process of the cluster: the
// control plane, kubelets, containerds, shims and pods (found by network
// namespace and by cgroup). The upstream registry runs inside the calling
// process and is not counted.
func (c *Cluster) Memory(ctx context.Context) (rssBytes int64, procs int, err error) {
	byCmd, procs, err := c.MemoryByCommand(ctx)
	for _, b := range byCmd {
		rssBytes += b
	}
	return rssBytes, procs, err
}

// MemoryByCommand is Memory split by process name (/proc/<pid>/comm).
func (c *Cluster) MemoryByCommand(ctx context.Context) (rss map[string]int64, procs int, err error) {
	pids := map[int]bool{}
	nss := []string{c.cpNS}
	for _, n := range c.Nodes {
		nss = append(nss, n.NS)
	}
	for _, ns := range nss {
		out, err := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output()
		if err != nil {
			return nil, 0, fmt.Errorf("ip netns pids %s: %w", ns, err)
		}
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids[pid] = true
			}
		}
	}
	for _, k := range c.Kubelets {
		_ = filepath.WalkDir(filepath.Join("/sys/fs/cgroup/pids", k.Cgroup), func(p string, e os.DirEntry, err error) error {
			if err == nil && e.Name() == "cgroup.procs" {
				b, _ := os.ReadFile(p)
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						pids[pid] = true
					}
				}
			}
			return nil
		})
	}
	// This process holds threads in the namespaces (the upstream
	// registry, listeners) but is the harness, not the cluster.
	delete(pids, os.Getpid())
	rss = map[string]int64{}
	for pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue // exited meanwhile
		}
		name := ""
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Name:"); ok {
				name = strings.TrimSpace(v)
			}
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				rss[name] += kb << 10
				procs++
			}
		}
	}
	return rss, procs, nil
}
