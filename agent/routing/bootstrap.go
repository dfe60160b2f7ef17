package routing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// IDPath is where the registry mounts IDHandler, so a peer's identity can be
// found from nothing but the host:port of its registry.
const IDPath = "/p2p/id"

const (
	fetchTimeout   = 5 * time.Second
	maxIDBody      = 64 << 10
	fetchParallel  = 8
	defaultDNSTake = 5
)

// Bootstrapper finds agents for a new node to join.
type Bootstrapper interface {
	// Peers returns agents to connect to; it may include this node, which the router skips.
	Peers(ctx context.Context) ([]peer.AddrInfo, error)
}

// IDResponse is the JSON body served at IDPath.
type IDResponse struct {
	ID    string   `json:"id"`
	Addrs []string `json:"addrs"`
}

// IDHandler serves this host's peer ID and multiaddrs as an IDResponse.
func (p *P2P) IDHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		resp := IDResponse{ID: p.host.ID().String(), Addrs: []string{}}
		for _, a := range p.host.Addrs() {
			resp.Addrs = append(resp.Addrs, a.String())
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(resp)
	})
}

// newHTTPClient is used when a bootstrapper has no Client. It ignores proxy
// settings: agents talk to each other directly inside the cluster.
func newHTTPClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	return &http.Client{Transport: t, Timeout: fetchTimeout}
}

// FetchID asks the agent whose registry listens on hostPort for its identity
// (GET http://hostPort/p2p/id). A nil client uses one without proxies.
func FetchID(ctx context.Context, client *http.Client, hostPort string) (peer.AddrInfo, error) {
	if client == nil {
		client = newHTTPClient()
	}
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+hostPort+IDPath, nil)
	if err != nil {
		return peer.AddrInfo{}, err
	}
	res, err := client.Do(req)
	if err != nil {
		return peer.AddrInfo{}, err
	}
	defer func() { _ = res.Body.Close() }()
	if res.StatusCode != http.StatusOK {
		return peer.AddrInfo{}, fmt.Errorf("GET %s: %s", req.URL, res.Status)
	}
	var body IDResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, maxIDBody)).Decode(&body); err != nil {
		return peer.AddrInfo{}, fmt.Errorf("GET %s: %w", req.URL, err)
	}
	id, err := peer.Decode(body.ID)
	if err != nil {
		return peer.AddrInfo{}, fmt.Errorf("GET %s: peer id: %w", req.URL, err)
	}
	var addrs []ma.Multiaddr
	for _, s := range body.Addrs {
		if m, err := ma.NewMultiaddr(s); err == nil {
			addrs = append(addrs, m)
		}
	}
	host, _, _ := net.SplitHostPort(hostPort)
	if target, err := netip.ParseAddr(host); err == nil {
		addrs = dialableAddrs(addrs, target.Unmap())
	}
	if len(addrs) == 0 {
		return peer.AddrInfo{}, fmt.Errorf("GET %s: no usable addresses", req.URL)
	}
	return peer.AddrInfo{ID: id, Addrs: addrs}, nil
}

// dialableAddrs narrows a peer's advertised addresses using the IP we reached
// its registry on: addresses on that IP are known to route. Without any, it
// drops loopback ones, which on another node would point back at ourselves.
func dialableAddrs(addrs []ma.Multiaddr, target netip.Addr) []ma.Multiaddr {
	var same, other []ma.Multiaddr
	for _, m := range addrs {
		ip, ok := multiaddrIP(m)
		switch {
		case ok && ip == target:
			same = append(same, m)
		case ok && ip.IsLoopback() && !target.IsLoopback():
		default:
			other = append(other, m)
		}
	}
	if len(same) > 0 {
		return same
	}
	return other
}

// fetchAll fetches the identity of every host:port, some at a time. It fails
// only if every fetch failed.
func fetchAll(ctx context.Context, client *http.Client, hostPorts []string) ([]peer.AddrInfo, error) {
	if client == nil {
		client = newHTTPClient()
	}
	var (
		mu    sync.Mutex
		infos []peer.AddrInfo
		errs  []error
		wg    sync.WaitGroup
	)
	sem := make(chan struct{}, fetchParallel)
	for _, hp := range hostPorts {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ai, err := FetchID(ctx, client, hp)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			infos = append(infos, ai)
		})
	}
	wg.Wait()
	if len(infos) == 0 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return mergeInfos(infos), nil
}

func mergeInfos(infos []peer.AddrInfo) []peer.AddrInfo {
	var out []peer.AddrInfo
	idx := map[peer.ID]int{}
	for _, ai := range infos {
		if i, ok := idx[ai.ID]; ok {
			for _, a := range ai.Addrs {
				if !slices.ContainsFunc(out[i].Addrs, a.Equal) {
					out[i].Addrs = append(out[i].Addrs, a)
				}
			}
			continue
		}
		idx[ai.ID] = len(out)
		out = append(out, peer.AddrInfo{ID: ai.ID, Addrs: slices.Clone(ai.Addrs)})
	}
	return out
}

// StaticBootstrapper joins a fixed list of agents.
type StaticBootstrapper struct {
	// Entries are multiaddrs ending in /p2p/<peer id>, or host:port of an
	// agent's registry whose identity is fetched from IDPath.
	Entries []string
	// Client fetches identities; nil uses a client without proxies.
	Client *http.Client
}

// Peers implements Bootstrapper.
func (s StaticBootstrapper) Peers(ctx context.Context) ([]peer.AddrInfo, error) {
	var direct []peer.AddrInfo
	var hostPorts []string
	var errs []error
	for _, e := range s.Entries {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		if strings.HasPrefix(e, "/") {
			ai, err := peer.AddrInfoFromString(e)
			if err != nil {
				errs = append(errs, fmt.Errorf("bootstrap entry %q: %w", e, err))
				continue
			}
			direct = append(direct, *ai)
			continue
		}
		hostPorts = append(hostPorts, e)
	}
	fetched, err := fetchAll(ctx, s.Client, hostPorts)
	if err != nil {
		errs = append(errs, err)
	}
	infos := mergeInfos(append(direct, fetched...))
	if len(infos) == 0 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return infos, nil
}

// Resolver resolves a name to IPs; *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// ResolverFunc adapts a function to Resolver.
type ResolverFunc func(ctx context.Context, network, host string) ([]netip.Addr, error)

// LookupNetIP implements Resolver.
func (f ResolverFunc) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	return f(ctx, network, host)
}

// DNSBootstrapper joins the agents behind a DNS name, typically the headless
// Service of the agent DaemonSet, which resolves to every ready agent's IP.
type DNSBootstrapper struct {
	// Name is the DNS name to resolve.
	Name string
	// Port is the registry port, the same on every agent.
	Port uint16
	// Resolver resolves Name; nil uses net.DefaultResolver.
	Resolver Resolver
	// Client fetches identities; nil uses a client without proxies.
	Client *http.Client
	// Max is how many agents to contact per call (default 5): joining a few
	// is enough, the DHT finds the rest.
	Max int
	// Skip lists this node's own IPs so it does not ask itself. Not needed
	// for correctness: the router skips its own peer ID anyway.
	Skip []netip.Addr
}

// Peers implements Bootstrapper.
func (d DNSBootstrapper) Peers(ctx context.Context) ([]peer.AddrInfo, error) {
	var r Resolver = net.DefaultResolver
	if d.Resolver != nil {
		r = d.Resolver
	}
	ips, err := r.LookupNetIP(ctx, "ip", d.Name)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", d.Name, err)
	}
	seen := map[netip.Addr]bool{}
	var cand []netip.Addr
	for _, ip := range ips {
		ip = ip.Unmap()
		if seen[ip] || slices.Contains(d.Skip, ip) {
			continue
		}
		seen[ip] = true
		cand = append(cand, ip)
	}
	// Random picks spread the join load over the cluster.
	rand.Shuffle(len(cand), func(i, j int) { cand[i], cand[j] = cand[j], cand[i] })
	take := d.Max
	if take <= 0 {
		take = defaultDNSTake
	}
	// One extra in case this node's own IP is among them.
	cand = cand[:min(len(cand), take+1)]
	hostPorts := make([]string, len(cand))
	for i, ip := range cand {
		hostPorts[i] = netip.AddrPortFrom(ip, d.Port).String()
	}
	return fetchAll(ctx, d.Client, hostPorts)
}

// bootstrapLoop joins the agents the Bootstrapper names: with backoff until
// one is joined, then every refresh interval so restarted or partitioned
// agents rejoin.
func (p *P2P) bootstrapLoop() {
	backoff := p.cfg.bootstrapMinBackoff
	for {
		var wait time.Duration
		if p.bootstrapOnce() {
			backoff = p.cfg.bootstrapMinBackoff
			wait = p.cfg.bootstrapRefresh
		} else {
			wait = backoff
			backoff = min(backoff*2, p.cfg.bootstrapMaxBackoff)
		}
		t := time.NewTimer(wait)
		select {
		case <-p.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (p *P2P) bootstrapOnce() bool {
	ctx, cancel := context.WithTimeout(p.ctx, bootstrapTimeout)
	defer cancel()
	infos, err := p.cfg.bootstrapper.Peers(ctx)
	if err != nil {
		if p.ctx.Err() == nil {
			p.log.Warn("bootstrap lookup failed; serving alone until a peer answers", "err", err)
			p.settleAlone()
		}
		return false
	}
	self := p.host.ID()
	infos = slices.DeleteFunc(infos, func(ai peer.AddrInfo) bool { return ai.ID == self || ai.ID == "" })
	if len(infos) == 0 {
		// Only ourselves (the first agent of a cluster): ready alone; others
		// will join us.
		if !p.settled.Swap(true) {
			p.log.Info("no other agents found; running alone")
		}
		return false
	}
	var joined atomic.Int64
	errs := make([]error, len(infos))
	var wg sync.WaitGroup
	for i, ai := range infos {
		wg.Go(func() {
			cctx, ccancel := context.WithTimeout(ctx, connectTimeout)
			defer ccancel()
			p.forgetFailedDials(ai.ID)
			if err := p.host.Connect(cctx, ai); err != nil {
				p.log.Debug("bootstrap connect failed", "peer", ai.ID.String(), "err", err)
				errs[i] = fmt.Errorf("%s at %v: %w", ai.ID, ai.Addrs, err)
				return
			}
			joined.Add(1)
		})
	}
	wg.Wait()
	if joined.Load() == 0 {
		if p.ctx.Err() == nil {
			// Each candidate's error says why (refused, wrong peer ID, timeout).
			p.log.Warn("could not join any bootstrap peer; serving alone until one answers", "candidates", len(infos), "err", errors.Join(errs...))
			p.settleAlone()
		}
		return false
	}
	if !p.settled.Swap(true) {
		p.log.Info("joined cluster", "peers", joined.Load())
	}
	// Fill the routing table beyond the bootstrap peers.
	_ = p.dht.Bootstrap(p.ctx)
	return true
}

// forgetFailedDials drops libp2p's dial backoff for a bootstrap candidate.
// After a failed dial the swarm refuses to dial that peer again for 5s or
// more ("dial backoff"), so a peer that was briefly unreachable, say while
// agents start together, stayed out of reach for several bootstrap rounds
// although its registry had just answered with its addresses.
func (p *P2P) forgetFailedDials(id peer.ID) {
	if s, ok := p.host.Network().(*swarm.Swarm); ok {
		s.Backoff().Clear(id)
	}
}

// settleAlone makes a node whose bootstrap peers are all unreachable ready
// on its own after the first round: its local content still serves, and
// requiring peers would deadlock a cluster whose agents all restart at once
// (the headless Service lists only ready agents). Bootstrap keeps retrying.
func (p *P2P) settleAlone() {
	p.settled.Store(true)
}
