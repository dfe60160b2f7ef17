package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"net/url"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/fleetmirror/fleetmirror/agent/advertise"
	"github.com/fleetmirror/fleetmirror/agent/canary"
	"github.com/fleetmirror/fleetmirror/agent/claim"
	"github.com/fleetmirror/fleetmirror/agent/fetch"
	"github.com/fleetmirror/fleetmirror/agent/hosts"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/nodetaint"
	"github.com/fleetmirror/fleetmirror/agent/peerauth"
	"github.com/fleetmirror/fleetmirror/agent/policy"
	"github.com/fleetmirror/fleetmirror/agent/prep"
	"github.com/fleetmirror/fleetmirror/agent/registry"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store"
	"github.com/fleetmirror/fleetmirror/agent/version"
	"github.com/fleetmirror/fleetmirror/agent/web"
	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

type mirrorConfig struct {
	containerdSocket    string
	containerdNamespace string
	contentDir          string
	registryAddr        string
	routerAddr          string
	metricsAddr         string
	mirrorTargets       cli.List
	mirroredRegistries  cli.List
	certsDir            string
	mirrorAdd           bool
	prependExisting     bool
	dialTimeout         time.Duration
	resolveTimeout      time.Duration
	resolveRetries      int
	burstSettle         time.Duration
	networkKeyFile      string
	privateRegistries   cli.List
	upstreamTags        cli.List
	localClients        cli.List
	bootstrapPeers      cli.List
	bootstrapDNS        string
	dataDir             string
	prepCheckConfig     string
	logLevel            string
	debugWeb            bool
	debugWebAddr        string
	debugPprof          bool
	maxRequests         int
	canaryInterval      time.Duration
	canaryGatesReady    bool
	releaseTaintAfter   time.Duration
	nodeName            string
	kubeAPI             string
	kubeTokenFile       string
	kubeCAFile          string
}

func mirrorCommand(fs *flag.FlagSet) func(context.Context) error {
	c := &mirrorConfig{}
	fs.StringVar(&c.containerdSocket, "containerd-socket", "/run/containerd/containerd.sock", "containerd's gRPC socket")
	fs.StringVar(&c.containerdNamespace, "containerd-namespace", "k8s.io", "containerd namespace whose images are mirrored")
	fs.StringVar(&c.contentDir, "containerd-content-dir", "/var/lib/containerd/io.containerd.content.v1.content",
		"containerd's content directory; blobs are read from it directly when mounted, else through the content API")
	fs.StringVar(&c.registryAddr, "registry-addr", ":30120", "listen address of the registry peers and containerd use")
	fs.StringVar(&c.routerAddr, "router-addr", ":30121", "listen address of the libp2p router")
	fs.StringVar(&c.metricsAddr, "metrics-addr", ":30122", "listen address of /metrics, /readyz and /livez")
	fs.Var(&c.mirrorTargets, "mirror-target", "URL containerd asks first, written into hosts.toml (default http://127.0.0.1:<registry port>)")
	fs.Var(&c.mirroredRegistries, "mirrored-registries", "registry URLs to mirror, e.g. https://docker.io,https://ghcr.io; empty mirrors all")
	fs.StringVar(&c.certsDir, "certs-dir", hosts.DefaultCertsDir, "containerd's registry config_path where hosts.toml files are written")
	fs.BoolVar(&c.mirrorAdd, "containerd-mirror-add", true, "write hosts.toml files; false when node user data writes them")
	fs.BoolVar(&c.prependExisting, "prepend-existing", false, "keep existing hosts.toml entries after the mirror")
	fs.DurationVar(&c.dialTimeout, "mirror-dial-timeout", 200*time.Millisecond, "containerd's dial timeout to the agent (containerd 2.x honours it)")
	fs.DurationVar(&c.resolveTimeout, "mirror-resolve-timeout", 20*time.Millisecond, "how long to look for a peer before containerd is sent upstream")
	fs.IntVar(&c.resolveRetries, "mirror-resolve-retries", 3, "how many peers to try for one request")
	fs.DurationVar(&c.burstSettle, "burst-settle", 100*time.Millisecond,
		"how long nodes that miss the same blob wait to agree which one fetches it upstream; 0 lets each fetch it")
	fs.StringVar(&c.networkKeyFile, "network-key-file", "",
		"file holding the cluster's shared secret (at least 32 bytes): only agents with it join the DHT and are served as peers; empty runs an open network")
	fs.Var(&c.privateRegistries, "private-registries", "registry hosts whose content is neither advertised nor served to peers, e.g. registry.corp.example:5000")
	fs.Var(&c.upstreamTags, "upstream-tags", "tags that always resolve upstream: :latest (in every repository), a registry, registry/repository, or registry/repository:tag")
	fs.Var(&c.localClients, "local-clients", "IPs or CIDRs the node's own containerd reaches the registry from, besides loopback and the mirror target's IP (e.g. the node's bridge address when a NodePort masquerades it)")
	fs.Var(&c.bootstrapPeers, "bootstrap-peers", "peers to join: host:port of their registries, or multiaddrs ending in /p2p/<id>")
	fs.StringVar(&c.bootstrapDNS, "bootstrap-dns", "", "DNS name listing the agents (the chart's headless Service)")
	fs.StringVar(&c.dataDir, "data-dir", "/var/lib/fleetmirror", "where the peer identity key is kept, the agent's only state")
	fs.StringVar(&c.prepCheckConfig, "prep-check-config", "",
		"containerd config.toml (read-only mount) that readiness checks like `agent prep --check`; empty disables the check")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.IntVar(&c.maxRequests, "max-requests", registry.DefaultMaxRequests,
		fmt.Sprintf("requests the registry serves at once, one client IP at most 1/%d of them; more get 503 or 429 with Retry-After", registry.ClientShare))
	fs.BoolVar(&c.debugWeb, "debug-web", true, "serve the debug page at /debug/web on --debug-web-addr")
	// Loopback by default: kubectl port-forward reaches it (it connects
	// to localhost in the pod's network namespace), the pod network does
	// not; set the node address to open it to the node network.
	fs.StringVar(&c.debugWebAddr, "debug-web-addr", "127.0.0.1:30123", "listen address of the debug page")
	fs.BoolVar(&c.debugPprof, "debug-pprof", false, "serve Go's profiles at /debug/pprof/ on the metrics address")
	fs.DurationVar(&c.canaryInterval, "canary-interval", canary.DefaultInterval,
		"how often containerd pulls the agent's canary image to prove the mirror path (also at start and after containerd restarts); 0 turns the canary off")
	// On: the operator releases a node held past its bound, and agents
	// release their own node when the operator is down (issue 16's fail
	// open), so a broken path cannot hold a node for good.
	fs.BoolVar(&c.canaryGatesReady, "canary-gates-readiness", true,
		"readiness waits for the canary's first proof and fails, with the reason, while the mirror path is broken")
	fs.DurationVar(&c.releaseTaintAfter, "release-taint-after", 0,
		"remove the operator's startup taint "+nodetaint.TaintKey+" from this node once the node is this old (node readiness's fallback when the operator is down; the operator's bound plus a minute); 0 turns it off")
	fs.StringVar(&c.nodeName, "node-name", "", "this node's name (downward API spec.nodeName), for --release-taint-after")
	fs.StringVar(&c.kubeAPI, "kube-api", nodetaint.InClusterAPI(), "the API server's URL, for --release-taint-after")
	fs.StringVar(&c.kubeTokenFile, "kube-token-file", nodetaint.DefaultTokenFile, "the pod's bound service account token, for --release-taint-after")
	fs.StringVar(&c.kubeCAFile, "kube-ca-file", nodetaint.DefaultCAFile, "the API server's CA, for --release-taint-after")
	return func(ctx context.Context) error { return runMirror(ctx, c) }
}

// validate checks the configuration before anything starts and returns
// the registry port and the registries to mirror.
func (c *mirrorConfig) validate() (uint16, []hosts.Registry, error) {
	var port uint16
	addrs := []struct{ flag, val string }{{"registry-addr", c.registryAddr}, {"router-addr", c.routerAddr}, {"metrics-addr", c.metricsAddr}}
	if c.debugWeb {
		addrs = append(addrs, struct{ flag, val string }{"debug-web-addr", c.debugWebAddr})
	}
	for _, a := range addrs {
		_, p, err := net.SplitHostPort(a.val)
		n, perr := strconv.ParseUint(p, 10, 16)
		if err != nil || perr != nil || n == 0 {
			return 0, nil, fmt.Errorf("--%s %q: want host:port or :port with a port from 1 to 65535", a.flag, a.val)
		}
		if a.flag == "registry-addr" {
			port = uint16(n)
		}
	}
	if c.resolveTimeout <= 0 || c.resolveTimeout > 10*time.Second {
		return 0, nil, fmt.Errorf("--mirror-resolve-timeout %s: want more than 0 and at most 10s (a miss costs this much)", c.resolveTimeout)
	}
	if c.burstSettle < 0 || c.burstSettle > 2*time.Second {
		return 0, nil, fmt.Errorf("--burst-settle %s: want 0 (off) to 2s; a blob miss waits this long", c.burstSettle)
	}
	if c.maxRequests < 1 || c.maxRequests > 1<<16 {
		return 0, nil, fmt.Errorf("--max-requests %d: want 1 to 65536", c.maxRequests)
	}
	if c.releaseTaintAfter < 0 || c.releaseTaintAfter > 0 && (c.nodeName == "" || c.kubeAPI == "") {
		return 0, nil, fmt.Errorf("--release-taint-after %s: want 0 (off), or more with --node-name and --kube-api (in a pod: the downward API's spec.nodeName and KUBERNETES_SERVICE_HOST)", c.releaseTaintAfter)
	}
	if c.canaryInterval < 0 || c.canaryInterval > 0 && c.canaryInterval < time.Second {
		return 0, nil, fmt.Errorf("--canary-interval %s: want 0 (off) or at least 1s (minutes in production)", c.canaryInterval)
	}
	if c.resolveRetries < 1 || c.resolveRetries > 20 {
		return 0, nil, fmt.Errorf("--mirror-resolve-retries %d: want 1 to 20", c.resolveRetries)
	}
	if len(c.bootstrapPeers) > 0 && c.bootstrapDNS != "" {
		return 0, nil, errors.New("--bootstrap-peers and --bootstrap-dns are both set: choose one")
	}
	if len(c.mirrorTargets) == 0 {
		c.mirrorTargets = cli.List{fmt.Sprintf("http://127.0.0.1:%d", port)}
	}
	var regs []hosts.Registry
	for _, r := range c.mirroredRegistries {
		reg, err := hosts.ParseRegistry(r)
		if err != nil {
			return 0, nil, fmt.Errorf("--mirrored-registries: %w", err)
		}
		regs = append(regs, reg)
	}
	if err := c.hostsConfig().Validate(); err != nil {
		return 0, nil, err
	}
	return port, regs, nil
}

// trust loads what the agent needs to take part as a member: the network
// key (nil for an open network) and the sharing policy.
func (c *mirrorConfig) trust(log *slog.Logger) (*peerauth.Key, *policy.Policy, error) {
	private := c.privateRegistries
	if c.canaryInterval > 0 {
		// The canary's images are the node's own proof: never advertised.
		private = append(slices.Clone(private), canary.Registry)
	}
	pol, err := policy.New(private, c.upstreamTags)
	if err != nil {
		return nil, nil, err
	}
	if c.networkKeyFile == "" {
		log.Warn("no --network-key-file: running an open network, where any process that reaches the router and registry ports can join, announce tags and read cached content")
		return nil, pol, nil
	}
	key, err := peerauth.Load(c.networkKeyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("--network-key-file: %w", err)
	}
	return key, pol, nil
}

// nodeClients are the networks the node's containerd reaches the
// registry from besides loopback: the IP hosts of its mirror targets and
// --local-clients.
func (c *mirrorConfig) nodeClients() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, t := range c.mirrorTargets {
		u, err := url.Parse(t)
		if err != nil {
			continue
		}
		if a, err := netip.ParseAddr(u.Hostname()); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
		}
	}
	for _, l := range c.localClients {
		p, err := netip.ParsePrefix(l)
		if err != nil {
			a, aerr := netip.ParseAddr(l)
			if aerr != nil {
				return nil, fmt.Errorf("--local-clients %q: want an IP or a CIDR such as 10.244.3.1 or 10.244.3.1/32", l)
			}
			p = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

func (c *mirrorConfig) hostsConfig() hosts.Config {
	cfg := hosts.Config{CertsDir: c.certsDir, MirrorTargets: c.mirrorTargets, Registries: c.mirroredRegistries,
		DialTimeout: c.dialTimeout, Prepend: c.prependExisting}
	if c.canaryInterval > 0 {
		cfg.Canary = canary.Registry
	}
	return cfg
}

// runMirror runs the agent: it checks the flags, builds the parts, then
// serves until ctx is done or a part fails.
func runMirror(ctx context.Context, c *mirrorConfig) error {
	log, err := cli.NewLogger(c.logLevel)
	if err != nil {
		return err
	}
	port, regs, err := c.validate()
	if err != nil {
		return err
	}
	if c.releaseTaintAfter > 0 {
		// First, before anything that may fail: an agent that never
		// gets ready must still let its node go.
		stop := c.releaseTaint(ctx, log)
		defer stop()
	}
	key, pol, err := c.trust(log)
	if err != nil {
		return err
	}
	if os.Getenv("GOGC") == "" {
		// The agent's live heap is small (about 18 MiB with 10,000
		// advertised digests) and its hot path allocates little, so a
		// tighter GC keeps RSS under 64 MiB for little CPU.
		debug.SetGCPercent(50)
	}
	log.Info("starting mirror", "version", version.Version, "registries", c.mirroredRegistries.String(), "resolveTimeout", c.resolveTimeout.String())

	a, err := c.build(ctx, port, regs, key, pol, log)
	if a != nil && a.router != nil {
		defer a.router.Close()
	}
	if err != nil {
		return err
	}
	if err := c.handlers(a, key, regs, log); err != nil {
		return err
	}
	lns, err := c.listen(a.debugPage != nil)
	if err != nil {
		return err
	}
	return c.serveAll(ctx, a, lns, log)
}

// agentParts are what runMirror wires together: built by build, given
// their HTTP handlers by handlers, run by serveAll.
type agentParts struct {
	st     *store.Containerd
	router *routing.P2P
	m      *metrics.Metrics
	can    *canary.Canary // nil when the canary is off
	tr     *advertise.Tracker
	reg    *registry.Registry
	ready  *readiness

	regMux, metricsMux *http.ServeMux
	debugPage          http.Handler // nil without --debug-web
}

// releaseTaint runs the startup taint's fallback release until the
// returned stop is called.
func (c *mirrorConfig) releaseTaint(ctx context.Context, log *slog.Logger) (stop func()) {
	rel, err := nodetaint.New(c.nodeName, c.releaseTaintAfter, c.kubeAPI, c.kubeTokenFile, c.kubeCAFile,
		nodetaint.WithLogger(log.With("component", "nodetaint")))
	if err != nil {
		log.Error("startup taint fallback off", "err", err.Error())
		return func() {}
	}
	rctx, stop := context.WithCancel(ctx)
	go rel.Run(rctx)
	return stop
}

// build makes the store, router, metrics, mirror, canary, tracker and
// registry. The parts come back with the error once the router exists,
// so the caller closes it.
func (c *mirrorConfig) build(ctx context.Context, port uint16, regs []hosts.Registry, key *peerauth.Key, pol *policy.Policy, log *slog.Logger) (*agentParts, error) {
	a := &agentParts{}
	stOpts := []store.Option{store.WithNamespace(c.containerdNamespace),
		store.WithContentDir(c.contentDir), store.WithLogger(log.With("component", "store"))}
	if pol.HasPrivate() {
		stOpts = append(stOpts, store.WithShared(pol.SharedImage))
	}
	st, err := store.NewContainerd(ctx, c.containerdSocket, stOpts...)
	if err != nil {
		return nil, err
	}
	a.st = st
	router, err := c.router(ctx, port, key, log)
	if err != nil {
		return nil, err
	}
	a.router = router

	m := metrics.New(func() int { return len(router.Peers()) }, metrics.WithRegistries(hostsOf(regs)))
	a.m = m
	mirOpts := []fetch.Option{fetch.WithResolveTimeout(c.resolveTimeout), fetch.WithPeers(c.resolveRetries),
		fetch.WithMetrics(m), fetch.WithLogger(log.With("component", "fetch"))}
	if key != nil {
		mirOpts = append(mirOpts, fetch.WithPeerKey(key))
	}
	mir, err := fetch.New(router, mirOpts...)
	if err != nil {
		return a, err
	}
	if a.can, err = c.canary(m, log); err != nil {
		return a, err
	}
	a.ready = c.readiness(st, router, a.can)
	tr, err := advertise.New(st, router, advertise.WithMetrics(m), advertise.WithLogger(log.With("component", "advertise")), advertise.WithRegistries(hostsOf(regs)), advertise.WithPolicy(pol))
	if err != nil {
		return a, err
	}
	a.tr = tr
	regOpts := []registry.Option{registry.WithFetcher(mir), registry.WithMetrics(m), registry.WithPolicy(pol),
		registry.WithLogger(log.With("component", "registry")), registry.WithReadiness(a.ready.check), registry.WithMaxRequests(c.maxRequests),
		registry.WithInFlight(store.NewInFlight(c.contentDir, fetch.StallTimeout), tr)}
	if c.burstSettle > 0 {
		regOpts = append(regOpts, registry.WithClaims(claim.New(router, c.burstSettle, log.With("component", "claim"))))
	}
	reg, err := registry.New(st, regOpts...)
	if err != nil {
		return a, err
	}
	a.reg = reg
	return a, nil
}

// readiness is the agent's /readyz policy: the store follows containerd,
// the router has joined its peers, hosts.toml is written, containerd is
// prepared (with --prep-check-config) and the canary has proved the path
// (with --canary-gates-readiness).
type readiness struct {
	st     interface{ Ready() error }
	router interface {
		Ready(context.Context) (bool, error)
	}
	// Read by /readyz handlers while the main goroutine writes hosts.toml.
	hostsWritten atomic.Bool
	prepStatus   func() (bool, string) // nil: not checked
	can          *canary.Canary        // nil: not gated on the canary
}

func (c *mirrorConfig) readiness(st *store.Containerd, router *routing.P2P, can *canary.Canary) *readiness {
	r := &readiness{st: st, router: router}
	r.hostsWritten.Store(!c.mirrorAdd)
	if c.prepCheckConfig != "" {
		r.prepStatus = c.prepStatus
	}
	if can != nil && c.canaryGatesReady {
		r.can = can
	}
	return r
}

// check returns why the agent is not ready, nil when it is.
func (r *readiness) check(ctx context.Context) error {
	if err := r.st.Ready(); err != nil {
		return err
	}
	if ok, err := r.router.Ready(ctx); !ok {
		return fmt.Errorf("router has not joined its peers yet: %v", err)
	}
	if !r.hostsWritten.Load() {
		return errors.New("hosts.toml not written yet")
	}
	if r.prepStatus != nil {
		// A node whose containerd ignores certs.d would silently pull
		// from upstream: show it as not ready, with the reason.
		if ok, detail := r.prepStatus(); !ok {
			return errors.New("containerd not prepared: " + detail)
		}
	}
	if r.can != nil {
		return r.can.Ready()
	}
	return nil
}

// handlers builds the registry's, the metrics' and the debug page's
// handlers.
func (c *mirrorConfig) handlers(a *agentParts, key *peerauth.Key, regs []hosts.Registry, log *slog.Logger) error {
	reg, m, can := a.reg, a.m, a.can
	regMux := http.NewServeMux()
	regMux.Handle("/p2p/id", a.router.IDHandler())
	local, err := c.nodeClients()
	if err != nil {
		return err
	}
	gate := peerauth.NewGate(key, peerauth.WithLocal(local), peerauth.WithLogger(log.With("component", "gate")),
		peerauth.WithDenied(func(reason string) { m.Denied.WithLabelValues(reason).Inc() }))
	// Content is gated; the probes and the peer ID are not: they tell
	// nothing about what the node holds.
	var content http.Handler = reg
	if can != nil {
		content = can.Wrap(reg)
	}
	regMux.Handle("/v2/", gate.Wrap(content))
	regMux.Handle("/", reg)
	metricsMux := http.NewServeMux()
	metricsMux.Handle("/metrics", m.Handler())
	metricsMux.Handle("/readyz", reg)
	metricsMux.Handle("/livez", reg)
	if can != nil {
		metricsMux.Handle("/canary", can.StatusHandler())
	} else {
		metricsMux.Handle("/canary", canary.DisabledHandler())
	}
	if c.debugPprof {
		metricsMux.HandleFunc("/debug/pprof/", pprof.Index)
		metricsMux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	a.regMux, a.metricsMux = regMux, metricsMux
	if c.debugWeb {
		if a.debugPage, err = c.debugPage(a.router, a.st, m, regs, can, log); err != nil {
			return err
		}
	}
	return nil
}

// listeners are the agent's open sockets; debug is nil without the debug
// page.
type listeners struct{ reg, metrics, debug net.Listener }

// listen opens every listener before anything serves, so a taken port
// fails the start.
func (c *mirrorConfig) listen(debugPage bool) (*listeners, error) {
	regLn, err := net.Listen("tcp", c.registryAddr)
	if err != nil {
		return nil, fmt.Errorf("--registry-addr %s: %w", c.registryAddr, err)
	}
	metricsLn, err := net.Listen("tcp", c.metricsAddr)
	if err != nil {
		regLn.Close()
		return nil, fmt.Errorf("--metrics-addr %s: %w", c.metricsAddr, err)
	}
	var debugLn net.Listener
	if debugPage {
		if debugLn, err = net.Listen("tcp", c.debugWebAddr); err != nil {
			regLn.Close()
			metricsLn.Close()
			return nil, fmt.Errorf("--debug-web-addr %s: %w", c.debugWebAddr, err)
		}
	}
	return &listeners{reg: regLn, metrics: metricsLn, debug: debugLn}, nil
}

// serveAll runs the parts and servers, writes hosts.toml once the
// registry listens, and waits until ctx is done or one of them fails.
func (c *mirrorConfig) serveAll(ctx context.Context, a *agentParts, lns *listeners, log *slog.Logger) error {
	st, tr, can := a.st, a.tr, a.can
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := st.Run(ctx); ctx.Err() == nil {
			return fmt.Errorf("following containerd: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		tr.Run(ctx)
		return nil
	})
	g.Go(func() error { return serve(ctx, log, lns.reg, a.regMux, maxHeaderBytes) })
	g.Go(func() error { return serve(ctx, log, lns.metrics, a.metricsMux, maxHeaderBytes) })
	if lns.debug != nil {
		// A browser on localhost may send other local apps' cookies.
		g.Go(func() error { return serve(ctx, log, lns.debug, a.debugPage, http.DefaultMaxHeaderBytes) })
	}
	if c.mirrorAdd {
		// Written once the registry listens, so containerd never meets a
		// mirror that is not there yet.
		if err := hosts.Write(c.hostsConfig()); err != nil {
			return fmt.Errorf("writing hosts.toml under %s: %w", c.certsDir, err)
		}
		a.ready.hostsWritten.Store(true)
		log.Info("wrote containerd mirror configuration", "certsDir", c.certsDir, "targets", c.mirrorTargets.String())
	}
	connected := st.Connected()
	if c.mirrorAdd {
		// In the group, so no rewrite outlives the agent's cleanup.
		in, rewritten := connected, make(chan struct{}, 1)
		g.Go(func() error {
			c.rewriteHosts(ctx, in, rewritten, log)
			return nil
		})
		connected = rewritten
	}
	if can != nil {
		// After hosts.toml, so the first run proves what was written; the
		// store's signal runs it at start and after containerd restarts.
		g.Go(func() error {
			can.Run(ctx, connected)
			return nil
		})
	}
	return g.Wait()
}

// rewriteHosts writes hosts.toml again each time the store reconnects to
// containerd, then passes the signal on (dropped if nobody takes it). A
// restart is when the node's folders change under the agent: prep
// restarts containerd right after it migrates an inline mirror into a
// registry folder of its own, which the agent then joins (mirror-all with
// prepend).
func (c *mirrorConfig) rewriteHosts(ctx context.Context, in <-chan struct{}, out chan<- struct{}, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-in:
		}
		if err := hosts.Write(c.hostsConfig()); err != nil {
			log.Warn("rewriting hosts.toml after containerd reconnected", "certsDir", c.certsDir, "err", err)
		}
		select {
		case out <- struct{}{}:
		default: // one pending signal is enough
		}
	}
}

// router starts the libp2p router, bootstrapping from the static peers or
// the DNS name when one is given.
func (c *mirrorConfig) router(ctx context.Context, port uint16, key *peerauth.Key, log *slog.Logger) (*routing.P2P, error) {
	opts := []routing.Option{routing.WithLogger(log.With("component", "routing"))}
	if key != nil {
		opts = append(opts, routing.WithNetworkKey(key.PSK()))
	}
	switch {
	case len(c.bootstrapPeers) > 0:
		opts = append(opts, routing.WithBootstrapper(routing.StaticBootstrapper{Entries: c.bootstrapPeers}))
	case c.bootstrapDNS != "":
		opts = append(opts, routing.WithBootstrapper(routing.DNSBootstrapper{Name: c.bootstrapDNS, Port: port}))
	}
	return routing.NewP2P(ctx, c.routerAddr, port, routing.IdentityKeyIn(c.dataDir), opts...)
}

// canary returns the node's canary, nil when --canary-interval is 0.
func (c *mirrorConfig) canary(m *metrics.Metrics, log *slog.Logger) (*canary.Canary, error) {
	if c.canaryInterval == 0 {
		return nil, nil
	}
	opts := []canary.Option{canary.WithContainerd(c.containerdSocket), canary.WithHosts(c.hostsConfig(), c.mirrorAdd),
		canary.WithInterval(c.canaryInterval), canary.WithMetrics(m), canary.WithLogger(log.With("component", "canary"))}
	if c.prepCheckConfig != "" {
		opts = append(opts, canary.WithConfigCheck(c.prepStatus))
	}
	return canary.New(opts...)
}

// debugPage serves /debug/web.
func (c *mirrorConfig) debugPage(router web.Router, st web.Keys, m *metrics.Metrics, regs []hosts.Registry, can *canary.Canary, log *slog.Logger) (http.Handler, error) {
	cfg := web.Config{
		RegistryURL:        localURL(c.registryAddr),
		MirroredRegistries: hostsOf(regs),
		MirrorTargets:      c.mirrorTargets,
		ResolveTimeout:     c.resolveTimeout,
		ResolveRetries:     c.resolveRetries,
		Version:            version.Version,
	}
	opts := []web.Option{web.WithLogger(log.With("component", "web"))}
	// Without --prep-check-config the page says "not configured".
	if c.prepCheckConfig != "" {
		opts = append(opts, web.WithPrepStatus(c.prepStatus))
	}
	if can != nil {
		opts = append(opts, web.WithCanaryStatus(func() (string, string) {
			s := can.Status()
			return s.Verdict, s.Summary()
		}))
	}
	dw, err := web.New(router, st, m.Registry, cfg, opts...)
	if err != nil {
		return nil, err
	}
	return dw.Handler(), nil
}

// prepStatus is the containerd-prep check as the debug page shows it.
func (c *mirrorConfig) prepStatus() (bool, string) {
	plan, err := prep.Check(prep.Config{Path: c.prepCheckConfig, Options: prep.Options{CertsDir: c.certsDir}})
	if err != nil {
		return false, err.Error()
	}
	if !plan.Ready() {
		return false, fmt.Sprintf("%s lacks config_path = %q or discard_unpacked_layers = false; run `agent prep`", c.prepCheckConfig, c.certsDir)
	}
	return true, fmt.Sprintf("%s sets config_path = %q and discard_unpacked_layers = false", c.prepCheckConfig, c.certsDir)
}

// localURL is the registry as a client on this node reaches it.
func localURL(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	if ip, err := netip.ParseAddr(host); host == "" || (err == nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port)
}

func hostsOf(regs []hosts.Registry) []string {
	out := make([]string, 0, len(regs))
	for _, r := range regs {
		out = append(out, r.Host)
	}
	return out
}

// maxHeaderBytes bounds a request's line and headers on the registry and
// metrics listeners: containerd's, peers' and Prometheus's requests carry a
// path and a few short headers, and Go's default would let every
// connection hold 1 MiB.
const maxHeaderBytes = 16 << 10

// serve runs an HTTP server until ctx is done, then drains it.
// drain bounds how long a stopping agent finishes the requests under way.
const drain = 10 * time.Second

func serve(ctx context.Context, log *slog.Logger, ln net.Listener, h http.Handler, maxHeader int) error {
	// Handlers get their own context, ended partway through the drain.
	base, cancelBase := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelBase()
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second,
		MaxHeaderBytes: maxHeader,
		BaseContext:    func(net.Listener) context.Context { return base },
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	// Responses under way get half the drain to finish; requests still
	// waiting then (on a peer's first bytes, a burst's fetcher) are
	// cancelled, so containerd goes upstream at once and the agent exits
	// inside its pod's grace period instead of being killed.
	stop := time.AfterFunc(drain/2, cancelBase)
	defer stop.Stop()
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	return nil
}
