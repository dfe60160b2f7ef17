package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Agent ports on every node.
const (
	AgentRegistryPort = 30120
	AgentRouterPort   = 30121
	AgentMetricsPort  = 30122
	// The debug page; on the node's IP here (the agent's default is
	// loopback), so tests reach it from outside the namespace.
	AgentDebugWebPort = 30123
)

// Node is one "machine": a network namespace with its own containerd and,
// optionally, its own agent.
type Node struct {
	Name       string // "n1", "n2", ...
	NS         string // network namespace
	IP         netip.Addr
	Dir        string // everything of this node except sockets
	CertsDir   string // containerd's registry config_path
	Socket     string // containerd gRPC socket (CRI and containerd API)
	ContentDir string // root/io.containerd.content.v1.content
	ConfigPath string // containerd config file
	CNIConfDir string // containerd's CNI config dir

	ContainerdLog string
	AgentLog      string
	// AgentBin, when set, replaces Options.AgentBin for this node: agents
	// of two versions in one cluster, as in a rolling update.
	AgentBin string
	// KeyFile, when set, replaces the cluster's network key for this
	// node's agent; "none" starts it without one.
	KeyFile string
	// AgentFlags, "--name=value" each, replace the flags of that name in
	// this node's agent command line (or are added), for the next start.
	AgentFlags []string

	// With Options.PrivateMounts: the file pinning the node's own mount
	// namespace, where its containerd and kubelet run and its dirs sit at
	// the standard paths (see HostPath), and the harness's view of the
	// node's /run/dbus. Both "" otherwise.
	MountNS string
	DBusDir string

	cluster       *Cluster
	binds         []bind
	configArg     string // --config as containerd sees it
	link          string // the node's end of its veth
	containerdBin string
	containerdEnv []string
	version       string

	mu         sync.Mutex
	containerd *proc
	agent      *proc
	conn       *grpc.ClientConn
}

// LocalClient is an HTTP client on the node itself: its connections start
// inside the node's network namespace, so http://127.0.0.1:30120 is the
// node's agent as its containerd reaches it.
func (n *Node) LocalClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialInNetns(ctx, nsPath(n.NS), network, addr)
		},
	}}
}

// LocalRegistryURL is the agent's registry as the node's containerd
// reaches it, for LocalClient.
func (n *Node) LocalRegistryURL() string {
	return fmt.Sprintf("http://127.0.0.1:%d", AgentRegistryPort)
}

// RegistryAddr is the agent's registry "IP:30120" as peers reach it.
func (n *Node) RegistryAddr() string {
	return netip.AddrPortFrom(n.IP, AgentRegistryPort).String()
}

// RouterAddr is the agent's routing "IP:30121".
func (n *Node) RouterAddr() string { return netip.AddrPortFrom(n.IP, AgentRouterPort).String() }

// MetricsURL is the agent's Prometheus endpoint.
func (n *Node) MetricsURL() string {
	return "http://" + netip.AddrPortFrom(n.IP, AgentMetricsPort).String() + "/metrics"
}

// logf logs through the cluster's logger with the node name in front.
func (n *Node) logf(format string, args ...any) {
	n.cluster.logf(n.Name+": "+format, args...)
}

// WriteHostsTOML writes certs.d/<host>/hosts.toml, for tests that set up
// containerd's registry config by hand.
func (n *Node) WriteHostsTOML(host, content string) error {
	dir := filepath.Join(n.CertsDir, host)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(content), 0o644)
}

// StartContainerd starts the node's containerd and waits until CRI answers.
func (n *Node) StartContainerd(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.containerd != nil && !n.containerd.exited() {
		return nil
	}
	// A socket left by a killed containerd would make the readiness check
	// talk to nothing; containerd removes and recreates it anyway.
	_ = os.Remove(n.Socket)
	p, err := startInNamespaces(n.NS, n.MountNS, n.ContainerdLog, n.containerdEnv, n.containerdBin, "--config", n.configArg)
	if err != nil {
		return err
	}
	n.containerd = p
	conn, err := grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	n.conn = conn
	deadline := time.Now().Add(30 * time.Second)
	for {
		if p.exited() {
			return fmt.Errorf("%s: containerd exited at start (%v); log tail:\n%s", n.Name, p.err, TailFile(n.ContainerdLog, 20))
		}
		if _, err := os.Stat(n.Socket); err == nil {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			_, err = runtimeapi.NewRuntimeServiceClient(conn).Version(cctx, &runtimeapi.VersionRequest{})
			cancel()
			if err == nil {
				n.logf("containerd %s ready (pid %d)", n.version, p.pid())
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: containerd CRI not ready after 30s: %v; log tail:\n%s", n.Name, err, TailFile(n.ContainerdLog, 20))
			}
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("%s: containerd socket %s not there: %w; log tail:\n%s", n.Name, n.Socket, errors.Join(ctx.Err(), errors.New("timeout")), TailFile(n.ContainerdLog, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StopContainerd stops containerd with SIGTERM (SIGKILL after 10s).
func (n *Node) StopContainerd() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	var err error
	if n.conn != nil {
		_ = n.conn.Close()
		n.conn = nil
	}
	if n.containerd != nil {
		err = n.containerd.stop(syscall.SIGTERM, 10*time.Second)
		n.containerd = nil
	}
	return err
}

// RestartContainerd is StopContainerd then StartContainerd, the way a node
// restarts containerd after a config change.
func (n *Node) RestartContainerd(ctx context.Context) error {
	if err := n.StopContainerd(); err != nil {
		return err
	}
	return n.StartContainerd(ctx)
}

// ContainerdPID is containerd's pid, 0 when not running.
func (n *Node) ContainerdPID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.containerd == nil || n.containerd.exited() {
		return 0
	}
	return n.containerd.pid()
}

// AgentArgs returns the full `agent mirror` command line used for this node.
//
// --registry-addr is ":30120" (all addresses of the namespace: its loopback
// and its IP, nothing else exists there) because containerd reaches the
// agent at the mirror target http://127.0.0.1:30120 while peers reach it at
// IP:30120. Options.AgentArgs come last so a test can override any flag.
func (n *Node) AgentArgs() []string {
	c := n.cluster
	var peers []string
	for _, o := range c.Nodes {
		if o != n {
			peers = append(peers, o.RegistryAddr())
		}
	}
	args := []string{
		"mirror",
		"--containerd-socket=" + n.Socket,
		"--containerd-content-dir=" + n.ContentDir,
		"--certs-dir=" + n.CertsDir,
		fmt.Sprintf("--registry-addr=:%d", AgentRegistryPort),
		"--router-addr=" + n.RouterAddr(),
		"--metrics-addr=" + netip.AddrPortFrom(n.IP, AgentMetricsPort).String(),
		fmt.Sprintf("--mirror-target=http://127.0.0.1:%d", AgentRegistryPort),
		"--mirrored-registries=" + strings.Join(c.mirrored, ","),
		"--bootstrap-peers=" + strings.Join(peers, ","),
		"--data-dir=" + filepath.Join(n.Dir, "agent"),
	}
	args = append(args, c.opts.AgentArgs...)
	for _, f := range n.AgentFlags {
		name, _, _ := strings.Cut(f, "=")
		args = slices.DeleteFunc(args, func(a string) bool { return strings.HasPrefix(a, name+"=") })
		args = append(args, f)
	}
	return args
}

func (n *Node) keyFile() string {
	switch n.KeyFile {
	case "none":
		return ""
	case "":
		return n.cluster.KeyFile
	}
	return n.KeyFile
}

// StartAgent starts the agent and waits up to 30s for GET /readyz == 200.
func (n *Node) StartAgent(ctx context.Context) error { return n.startAgent(ctx, "/readyz") }

// StartAgentLive starts the agent and waits only until it serves
// (GET /livez == 200), for agents that are not meant to become ready.
func (n *Node) StartAgentLive(ctx context.Context) error { return n.startAgent(ctx, "/livez") }

func (n *Node) startAgent(ctx context.Context, probe string) error {
	bin := n.cluster.opts.AgentBin
	if n.AgentBin != "" {
		bin = n.AgentBin
	}
	if bin == "" {
		return errors.New("StartAgent: Options.AgentBin is empty")
	}
	n.mu.Lock()
	if n.agent != nil && !n.agent.exited() {
		n.mu.Unlock()
		return nil
	}
	if err := os.MkdirAll(filepath.Join(n.Dir, "agent"), 0o755); err != nil {
		n.mu.Unlock()
		return err
	}
	// Flags newer than the previous release go in the environment, which
	// agents that predate them ignore: the debug page on the node's IP (so
	// tests outside reach it) and the network key.
	env := []string{"FLEETMIRROR_DEBUG_WEB_ADDR=" + netip.AddrPortFrom(n.IP, AgentDebugWebPort).String()}
	if key := n.keyFile(); key != "" {
		env = append(env, "FLEETMIRROR_NETWORK_KEY_FILE="+key)
	}
	p, err := startInNetns(n.NS, n.AgentLog, env, bin, n.AgentArgs()...)
	if err != nil {
		n.mu.Unlock()
		return err
	}
	n.agent = p
	n.mu.Unlock()

	url := "http://" + n.RegistryAddr() + probe
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("%s: agent exited at start (%v); log tail:\n%s", n.Name, p.err, TailFile(n.AgentLog, 30))
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				n.logf("agent answers %s (pid %d)", probe, p.pid())
				return nil
			}
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		last = err
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("%s: agent not answering %s after 30s: %v; log tail:\n%s", n.Name, probe, errors.Join(last, ctx.Err()), TailFile(n.AgentLog, 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (n *Node) stopAgent(sig syscall.Signal) error {
	n.mu.Lock()
	p := n.agent
	n.agent = nil
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.stop(sig, 10*time.Second)
}

// StopAgent stops the agent gracefully (SIGTERM, SIGKILL after 10s).
func (n *Node) StopAgent() error { return n.stopAgent(syscall.SIGTERM) }

// KillAgent kills the agent with SIGKILL, like a crash or OOM kill.
func (n *Node) KillAgent() error { return n.stopAgent(syscall.SIGKILL) }

// AgentPID is the agent's pid, 0 when not running.
func (n *Node) AgentPID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent == nil || n.agent.exited() {
		return 0
	}
	return n.agent.pid()
}

func (n *Node) criConn() (*grpc.ClientConn, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		return nil, fmt.Errorf("%s: containerd is not running", n.Name)
	}
	return n.conn, nil
}

func (n *Node) images() (runtimeapi.ImageServiceClient, error) {
	conn, err := n.criConn()
	if err != nil {
		return nil, err
	}
	return runtimeapi.NewImageServiceClient(conn), nil
}

// Pull pulls ref through CRI PullImage, the call kubelet makes, and returns
// the wall time it took.
func (n *Node) Pull(ctx context.Context, ref string) (time.Duration, error) {
	is, err := n.images()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	_, err = is.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	d := time.Since(start)
	if err != nil {
		return d, fmt.Errorf("%s: CRI pull %s: %w", n.Name, ref, err)
	}
	n.logf("pulled %s in %v", ref, d.Round(time.Millisecond))
	return d, nil
}

// RemoveImage removes ref through CRI RemoveImage; containerd's GC then
// deletes blobs no other image uses.
func (n *Node) RemoveImage(ctx context.Context, ref string) error {
	is, err := n.images()
	if err != nil {
		return err
	}
	if _, err := is.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("%s: CRI remove %s: %w", n.Name, ref, err)
	}
	return nil
}

// ImageInfo is what CRI reports about one image.
type ImageInfo struct {
	ID          string // config digest
	RepoTags    []string
	RepoDigests []string // name@manifest digest
	Size        uint64
}

func imageInfo(i *runtimeapi.Image) ImageInfo {
	return ImageInfo{ID: i.GetId(), RepoTags: i.GetRepoTags(), RepoDigests: i.GetRepoDigests(), Size: i.GetSize()}
}

// ImageStatus reports ref through CRI ImageStatus; found is false when the
// node does not have it.
func (n *Node) ImageStatus(ctx context.Context, ref string) (info ImageInfo, found bool, err error) {
	is, err := n.images()
	if err != nil {
		return ImageInfo{}, false, err
	}
	resp, err := is.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return ImageInfo{}, false, fmt.Errorf("%s: CRI image status %s: %w", n.Name, ref, err)
	}
	if resp.GetImage() == nil {
		return ImageInfo{}, false, nil
	}
	return imageInfo(resp.GetImage()), true, nil
}

// ImageDigest returns the manifest digest ref resolved to on this node.
func (n *Node) ImageDigest(ctx context.Context, ref string) (digest.Digest, error) {
	info, found, err := n.ImageStatus(ctx, ref)
	if err != nil {
		return "", err
	}
	if !found {
		return "", fmt.Errorf("%s: image %s not present", n.Name, ref)
	}
	for _, rd := range info.RepoDigests {
		if _, d, ok := strings.Cut(rd, "@"); ok {
			return digest.Parse(d)
		}
	}
	return "", fmt.Errorf("%s: image %s has no repo digest", n.Name, ref)
}

// ListImages lists images through CRI ListImages.
func (n *Node) ListImages(ctx context.Context) ([]ImageInfo, error) {
	is, err := n.images()
	if err != nil {
		return nil, err
	}
	resp, err := is.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		return nil, fmt.Errorf("%s: CRI list images: %w", n.Name, err)
	}
	var out []ImageInfo
	for _, i := range resp.GetImages() {
		out = append(out, imageInfo(i))
	}
	return out, nil
}

// BlobPath is where containerd keeps blob d.
func (n *Node) BlobPath(d digest.Digest) string {
	return filepath.Join(n.ContentDir, "blobs", d.Algorithm().String(), d.Encoded())
}

// VerifyContent checks that every blob is in the node's content store and
// hashes to its digest.
func (n *Node) VerifyContent(ctx context.Context, digests []digest.Digest) error {
	var errs []error
	for _, d := range digests {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := d.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		f, err := os.Open(n.BlobPath(d))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: blob %s: %w", n.Name, d, err))
			continue
		}
		v := d.Verifier()
		_, err = io.Copy(v, f)
		f.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: read blob %s: %w", n.Name, d, err))
		} else if !v.Verified() {
			errs = append(errs, fmt.Errorf("%s: blob %s: content does not match its digest", n.Name, d))
		}
	}
	return errors.Join(errs...)
}

// HasBlob reports whether the content store holds d (without hashing it).
func (n *Node) HasBlob(d digest.Digest) bool {
	_, err := os.Stat(n.BlobPath(d))
	return err == nil
}

// LogTail returns the last lines of the containerd and agent logs.
func (n *Node) LogTail(lines int) string {
	s := fmt.Sprintf("--- %s containerd (%s) ---\n%s", n.Name, n.ContainerdLog, TailFile(n.ContainerdLog, lines))
	if _, err := os.Stat(n.AgentLog); err == nil {
		s += fmt.Sprintf("--- %s agent (%s) ---\n%s", n.Name, n.AgentLog, TailFile(n.AgentLog, lines))
	}
	return s
}

// ShapeEgress limits what the node sends over its link to bytesPerSec with
// a tbf qdisc (this kernel has no netem); 0 removes the limit. Loopback
// traffic (containerd to its own agent) is not shaped.
func (n *Node) ShapeEgress(ctx context.Context, bytesPerSec int64) error {
	if bytesPerSec <= 0 {
		err := run(ctx, "tc", "-n", n.NS, "qdisc", "del", "dev", n.link, "root")
		// Deleting the default qdisc means there was no limit to remove.
		if err != nil && (strings.Contains(err.Error(), "No such file") || strings.Contains(err.Error(), "handle of zero")) {
			return nil
		}
		return err
	}
	// tbf needs a bucket of at least rate/HZ; a larger one keeps throughput
	// close to the rate.
	burst := max(bytesPerSec/50, 64<<10)
	return run(ctx, "tc", "-n", n.NS, "qdisc", "replace", "dev", n.link, "root", "tbf",
		"rate", fmt.Sprintf("%dbit", bytesPerSec*8), "burst", fmt.Sprint(burst), "latency", "200ms")
}
