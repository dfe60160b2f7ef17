package routing

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/simplelru"
	"github.com/ipfs/go-cid"
	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pb "github.com/libp2p/go-libp2p-kad-dht/pb"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/multiformats/go-base32"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/multiformats/go-multihash"

	"github.com/fleetmirror/fleetmirror/agent/internal/atomicfile"
)

const (
	// ProtocolPrefix keeps fleetmirror's DHT apart from the public IPFS one:
	// peers speaking /ipfs/kad never mix with ours.
	ProtocolPrefix = "/fleetmirror"
	// KeyFile is the name of the identity key inside the data directory.
	KeyFile = "peer.key"

	provideConcurrency = 16
	provideTimeout     = 20 * time.Second
	connectTimeout     = 5 * time.Second
	bootstrapTimeout   = 30 * time.Second
	// providerCacheSize bounds the provider manager's read cache. Amino's
	// default (256) is small for a node that stores records for many layers.
	providerCacheSize = 4096
	// pushDedup skips pushing all keys twice to a peer that identified over
	// several connections at once.
	pushDedup = 5 * time.Second
)

// ErrClosed is returned by a closed P2P.
var ErrClosed = errors.New("routing: closed")

var dhtProtocol = protocol.ID(ProtocolPrefix + "/kad/1.0.0")

// P2P is a Router on a libp2p host running a Kademlia DHT (go-libp2p-kad-dht)
// in server mode under the /fleetmirror protocol prefix.
//
// Keys are announced as DHT provider records. Withdraw only stops this node
// from announcing a key and drops it from the local provider store: the DHT
// has no way to revoke records other peers already hold, so those stay until
// their validity (WithProvideValidity, 15 minutes by default) runs out. Until
// then a lookup may still return this node for a withdrawn key; the requester
// gets a miss from it and fails over to the next peer or upstream.
type P2P struct {
	cfg  p2pConfig
	log  *slog.Logger
	host host.Host
	dht  *dht.IpfsDHT
	msgr *pb.ProtocolMessenger
	// dstore and cache back the DHT's provider store; Withdraw edits them
	// directly because the provider manager has no delete.
	dstore *boundedStore
	cache  *syncLRU
	sub    event.Subscription

	ctx       context.Context
	cancel    context.CancelFunc
	stopAfter func() bool
	wg        sync.WaitGroup

	mu     sync.Mutex
	closed bool
	keys   map[string]cid.Cid

	// settled is set once bootstrap found no other agent or joined one.
	settled atomic.Bool

	pendingMu sync.Mutex
	pending   map[peer.ID]struct{}
	pendingCh chan struct{}

	closeOnce sync.Once
	closeErr  error
}

var _ Router = (*P2P)(nil)

// NewP2P starts a libp2p host and DHT. It never waits for bootstrap, which
// runs in the background until ctx is cancelled or Close is called.
func NewP2P(ctx context.Context, opts ...Option) (*P2P, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("routing: %w", err)
		}
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "p2p")

	listen, err := listenMultiaddr(cfg.listenAddr)
	if err != nil {
		return nil, err
	}
	key := cfg.privKey
	if key == nil {
		if key, err = loadOrCreateKey(cfg.dataDir); err != nil {
			return nil, err
		}
	}

	// Only what a private cluster needs, so the host never sends traffic on
	// its own: TCP only (no QUIC/WebRTC/WebTransport), no relay, no NAT port
	// mapping (that is opt-in via NATPortMap, which we never set), no hole
	// punching or AutoRelay (opt-in too), no AutoNATv2 (opt-in); AutoNAT v1
	// only probes public addresses and is pinned to a fixed reachability so it
	// never starts probing. Metrics are off so several hosts per process (tests)
	// do not collide in the global Prometheus registry.
	hostOpts := []libp2p.Option{
		libp2p.Identity(key),
		libp2p.ListenAddrs(listen),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.DisableRelay(),
		libp2p.ForceReachabilityPrivate(),
		libp2p.DisableIdentifyAddressDiscovery(),
		libp2p.DisableMetrics(),
	}
	if cfg.psk != nil {
		// A private network: every connection starts with a handshake
		// keyed by the PSK, so a process without the cluster's key
		// cannot complete one, let alone store a record or answer a
		// lookup.
		hostOpts = append(hostOpts, libp2p.PrivateNetwork(cfg.psk))
	}
	h, err := libp2p.New(hostOpts...)
	if err != nil {
		return nil, fmt.Errorf("routing: libp2p host: %w", err)
	}

	dstore := newBoundedStore(dssync.MutexWrap(ds.NewMapDatastore()), h.ID(), maxRecordsPerPeer)
	cache, err := newSyncLRU(providerCacheSize)
	if err != nil {
		_ = h.Close()
		return nil, err
	}
	validity := cfg.provideValidity
	d, err := dht.New(h,
		dht.Mode(dht.ModeServer),
		dht.ProtocolPrefix(ProtocolPrefix),
		// Explicitly no bootstrap peers: kad-dht v0.42 has none by default, and
		// we join through our own Bootstrapper instead of public IPFS nodes.
		dht.BootstrapPeers(),
		dht.Datastore(dstore),
		// We only use provider records.
		dht.DisableValues(),
		// The default filters already accept private and loopback peers (the
		// public-only ones are opt-in and the diversity filter is unset); set
		// them explicitly so an upstream default change cannot drop 10.x peers.
		dht.RoutingTableFilter(func(any, peer.ID) bool { return true }),
		dht.QueryFilter(func(any, peer.AddrInfo) bool { return true }),
		// kad-dht has no custom ProviderStore hook, but its provider manager
		// takes the validity other peers' records are kept for. Amino's 48h
		// would keep a withdrawn or dead node in lookups for days.
		dht.ProviderManagerOpts(
			records.ProvideValidity(validity),
			records.ProviderAddrTTL(validity),
			records.CleanupInterval(validity/2),
			records.Cache(cache),
		),
	)
	if err != nil {
		_ = h.Close()
		return nil, fmt.Errorf("routing: dht: %w", err)
	}
	msgr, err := pb.NewProtocolMessenger(d.MessageSender())
	if err != nil {
		_ = d.Close()
		_ = h.Close()
		return nil, fmt.Errorf("routing: %w", err)
	}
	sub, err := h.EventBus().Subscribe(new(event.EvtPeerIdentificationCompleted))
	if err != nil {
		_ = d.Close()
		_ = h.Close()
		return nil, fmt.Errorf("routing: %w", err)
	}

	p := &P2P{
		cfg:       cfg,
		log:       log,
		host:      h,
		dht:       d,
		msgr:      msgr,
		dstore:    dstore,
		cache:     cache,
		sub:       sub,
		keys:      map[string]cid.Cid{},
		pending:   map[peer.ID]struct{}{},
		pendingCh: make(chan struct{}, 1),
	}
	p.ctx, p.cancel = context.WithCancel(context.WithoutCancel(ctx))
	p.stopAfter = context.AfterFunc(ctx, func() { _ = p.Close() })

	p.wg.Go(p.watchPeers)
	p.wg.Go(p.pushLoop)
	p.wg.Go(p.reprovideLoop)
	if cfg.bootstrapper != nil {
		p.wg.Go(p.bootstrapLoop)
	}
	log.Info("p2p router started", "id", h.ID().String(), "addrs", h.Addrs())
	return p, nil
}

// ID returns this node's peer ID.
func (p *P2P) ID() peer.ID { return p.host.ID() }

// Addrs returns the multiaddrs the host listens on.
func (p *P2P) Addrs() []ma.Multiaddr { return p.host.Addrs() }

// Close stops the background work and shuts the DHT and host down. It is
// safe to call more than once.
func (p *P2P) Close() error {
	p.closeOnce.Do(func() {
		p.stopAfter()
		p.mu.Lock()
		p.closed = true
		p.mu.Unlock()
		p.cancel()
		_ = p.sub.Close()
		p.wg.Wait()
		p.closeErr = errors.Join(p.dht.Close(), p.host.Close())
	})
	return p.closeErr
}

// track registers a goroutine that Close must wait for; false once closed.
func (p *P2P) track() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.wg.Add(1)
	return true
}

// Ready implements Router: true without a Bootstrapper, once bootstrap found
// no agent but this one or joined one, or once the routing table has a peer.
// It stays true after that, since a node that lost its peers still works alone.
func (p *P2P) Ready(context.Context) (bool, error) {
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return false, ErrClosed
	}
	if p.cfg.bootstrapper == nil || p.settled.Load() {
		return true, nil
	}
	return p.dht.RoutingTable().Size() > 0, nil
}

// Advertise implements Router. The keys are remembered and re-provided every
// 2/3 of the provide validity and to peers that join later, so announcing on
// a node without peers is not an error.
func (p *P2P) Advertise(ctx context.Context, keys []string) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	cids := make([]cid.Cid, 0, len(keys))
	for _, k := range keys {
		c := keyCID(k)
		p.keys[k] = c
		cids = append(cids, c)
	}
	p.mu.Unlock()
	return p.provide(ctx, cids)
}

// Withdraw implements Router: the keys are no longer re-provided and this
// node drops itself from its own provider store, so it stops answering for
// them. Records already stored on other peers expire on their own (see P2P).
func (p *P2P) Withdraw(ctx context.Context, keys []string) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	for _, k := range keys {
		delete(p.keys, k)
	}
	p.mu.Unlock()

	self := base32.RawStdEncoding.EncodeToString([]byte(p.host.ID()))
	var errs []error
	for _, k := range keys {
		mh := keyCID(k).Hash()
		// Same key layout as records.ProviderManager's datastore entries.
		dk := ds.NewKey(records.ProvidersKeyPrefix + base32.RawStdEncoding.EncodeToString(mh) + "/" + self)
		if err := p.dstore.Delete(ctx, dk); err != nil && !errors.Is(err, ds.ErrNotFound) {
			errs = append(errs, err)
		}
		// Drop the cached set so the next read reloads it without us.
		p.cache.Remove(string(mh))
	}
	return errors.Join(errs...)
}

// Lookup implements Router. The local provider store is consulted first (by
// kad-dht), then the network; results stream as they arrive.
func (p *P2P) Lookup(ctx context.Context, key string, count int) (<-chan netip.AddrPort, error) {
	if count <= 0 {
		ch := make(chan netip.AddrPort)
		close(ch)
		return ch, nil
	}
	if !p.track() {
		return nil, ErrClosed
	}
	c := keyCID(key)
	out := make(chan netip.AddrPort, min(count, 64))
	lctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(p.ctx, cancel)
	go func() {
		defer p.wg.Done()
		defer close(out)
		defer stop()
		defer cancel()
		self := p.host.ID()
		sent := 0
		// count 0 asks kad-dht for all providers: with a limit it would count
		// this node and address-less providers against it. We stop ourselves.
		for ai := range p.dht.FindProvidersAsync(lctx, c, 0) {
			if ai.ID == self {
				continue
			}
			ip, ok := p.peerIP(ai)
			if !ok {
				// A provider this node never met comes without addresses
				// when the record holder had none to hand on: ask the DHT.
				if found, err := p.dht.FindPeer(lctx, ai.ID); err == nil {
					ip, ok = p.peerIP(found)
				}
			}
			if !ok {
				p.log.Debug("provider without usable address", "peer", ai.ID.String())
				continue
			}
			select {
			case out <- netip.AddrPortFrom(ip, p.cfg.registryPort):
			case <-lctx.Done():
				return
			}
			if sent++; sent >= count {
				return
			}
		}
	}()
	return out, nil
}

// Peers returns the connected peers with their registry address (IP and
// registry port), for status pages.
func (p *P2P) Peers() []Peer {
	ids := p.host.Network().Peers()
	out := make([]Peer, 0, len(ids))
	for _, id := range ids {
		pr := Peer{ID: id.String()}
		if ip, ok := p.peerIP(peer.AddrInfo{ID: id}); ok {
			pr.Address = netip.AddrPortFrom(ip, p.cfg.registryPort).String()
		}
		out = append(out, pr)
	}
	slices.SortFunc(out, func(a, b Peer) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return out
}

// peerIP picks the IP to reach a peer's registry on: the addresses it
// advertises (its --router-addr, the node IP) first, then the address of a
// connection to it. Loopback is a last resort, since on a real cluster it
// would point at us.
func (p *P2P) peerIP(ai peer.AddrInfo) (netip.Addr, bool) {
	var fallback netip.Addr
	pick := func(addrs []ma.Multiaddr) (netip.Addr, bool) {
		for _, m := range addrs {
			ip, ok := multiaddrIP(m)
			if !ok {
				continue
			}
			if ip.IsLoopback() {
				if !fallback.IsValid() {
					fallback = ip
				}
				continue
			}
			return ip, true
		}
		return netip.Addr{}, false
	}
	var conns []ma.Multiaddr
	for _, c := range p.host.Network().ConnsToPeer(ai.ID) {
		conns = append(conns, c.RemoteMultiaddr())
	}
	// A connection's address is its source address, which a multi-homed
	// node (or loopback in tests) can pick apart from where it listens.
	for _, set := range [][]ma.Multiaddr{ai.Addrs, p.host.Peerstore().Addrs(ai.ID), conns} {
		if ip, ok := pick(set); ok {
			return ip, true
		}
	}
	return fallback, fallback.IsValid()
}

// multiaddrIP returns the IP of a direct IP multiaddr.
func multiaddrIP(m ma.Multiaddr) (netip.Addr, bool) {
	if m == nil {
		return netip.Addr{}, false
	}
	if _, err := m.ValueForProtocol(ma.P_CIRCUIT); err == nil {
		return netip.Addr{}, false // relayed: the IP is the relay's
	}
	nip, err := manet.ToIP(m)
	if err != nil {
		return netip.Addr{}, false
	}
	ip, ok := netip.AddrFromSlice(nip)
	if !ok {
		return netip.Addr{}, false
	}
	ip = ip.Unmap()
	if ip.IsUnspecified() || ip.IsMulticast() || ip.IsLinkLocalUnicast() {
		return netip.Addr{}, false
	}
	return ip, true
}

// provide announces cids, 16 at a time. Failures are logged, not returned:
// the keys stay in the set and are retried by the next reprovide.
func (p *P2P) provide(ctx context.Context, cids []cid.Cid) error {
	if len(cids) == 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(p.ctx, cancel)
	defer stop()

	// With an empty routing table only the local record is written: a lone
	// node has nobody to tell, and peers get the keys pushed when they join.
	broadcast := p.dht.RoutingTable().Size() > 0
	sem := make(chan struct{}, provideConcurrency)
	var wg sync.WaitGroup
	var failed atomic.Int64
loop:
	for _, c := range cids {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break loop
		}
		wg.Go(func() {
			defer func() { <-sem }()
			pctx, pcancel := context.WithTimeout(ctx, provideTimeout)
			defer pcancel()
			err := p.dht.Provide(pctx, c, broadcast)
			if err != nil && !errors.Is(err, kb.ErrLookupFailure) && ctx.Err() == nil {
				failed.Add(1)
				p.log.Debug("provide failed", "cid", c.String(), "err", err)
			}
		})
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		p.log.Warn("some keys could not be provided; retrying on next reprovide", "failed", n, "keys", len(cids))
	}
	return ctx.Err()
}

func (p *P2P) snapshot() []cid.Cid {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]cid.Cid, 0, len(p.keys))
	for _, c := range p.keys {
		out = append(out, c)
	}
	return out
}

// reprovideLoop re-announces all keys at 2/3 of the validity, so records on
// other peers (and our own local one) never lapse while we hold the keys.
func (p *P2P) reprovideLoop() {
	t := time.NewTicker(p.cfg.provideValidity * 2 / 3)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
			keys := p.snapshot()
			start := time.Now()
			_ = p.provide(p.ctx, keys)
			p.log.Debug("reprovided", "keys", len(keys), "took", time.Since(start))
		}
	}
}

// watchPeers queues every newly identified DHT peer for a push of our keys.
// This is what lets a node that joined later find keys announced before it
// existed, without waiting for the next reprovide.
func (p *P2P) watchPeers() {
	for {
		select {
		case <-p.ctx.Done():
			return
		case e, ok := <-p.sub.Out():
			if !ok {
				return
			}
			ev, ok := e.(event.EvtPeerIdentificationCompleted)
			if !ok || !slices.Contains(ev.Protocols, dhtProtocol) {
				continue
			}
			p.pendingMu.Lock()
			p.pending[ev.Peer] = struct{}{}
			p.pendingMu.Unlock()
			select {
			case p.pendingCh <- struct{}{}:
			default:
			}
		}
	}
}

func (p *P2P) pushLoop() {
	last := map[peer.ID]time.Time{}
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-p.pendingCh:
		}
		p.pendingMu.Lock()
		peers := p.pending
		p.pending = map[peer.ID]struct{}{}
		p.pendingMu.Unlock()
		now := time.Now()
		for id, t := range last {
			if now.Sub(t) > pushDedup {
				delete(last, id)
			}
		}
		for id := range peers {
			if _, dup := last[id]; dup {
				continue
			}
			last[id] = now
			p.pushTo(id)
		}
	}
}

// pushTo sends our provider records straight to a newly joined peer for the
// keys it is among the K closest peers to, which is where a provide would
// have put them had the peer been there. One message per key on one stream
// is much cheaper than re-running a DHT provide of every key.
func (p *P2P) pushTo(id peer.ID) {
	keys := p.snapshot()
	if len(keys) == 0 {
		return
	}
	self := peer.AddrInfo{ID: p.host.ID(), Addrs: p.dht.FilteredAddrs()}
	if len(self.Addrs) == 0 {
		return
	}
	rt := p.dht.RoutingTable()
	k := p.dht.BucketSize()
	sent := 0
	for _, c := range keys {
		mh := c.Hash()
		nearest := rt.NearestPeers(kb.ConvertKey(string(mh)), k)
		if len(nearest) >= k && !slices.Contains(nearest, id) && !kb.Closer(id, nearest[len(nearest)-1], string(mh)) {
			continue
		}
		ctx, cancel := context.WithTimeout(p.ctx, connectTimeout)
		err := p.msgr.PutProviderAddrs(ctx, id, mh, self)
		cancel()
		if err != nil {
			p.log.Debug("push to new peer failed", "peer", id.String(), "err", err)
			return
		}
		sent++
	}
	p.log.Debug("pushed keys to new peer", "peer", id.String(), "keys", sent)
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

// keyCID maps a key (digest or tag key) to a CIDv1, raw codec, whose
// multihash is sha2-256 of the key string.
func keyCID(key string) cid.Cid {
	mh, err := multihash.Sum([]byte(key), multihash.SHA2_256, -1)
	if err != nil {
		panic(err) // sha2-256 is always available
	}
	return cid.NewCidV1(cid.Raw, mh)
}

func listenMultiaddr(hostPort string) (ma.Multiaddr, error) {
	h, ps, err := net.SplitHostPort(hostPort)
	if err != nil {
		return nil, fmt.Errorf("routing: listen address %q: %w", hostPort, err)
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("routing: listen address %q: bad port", hostPort)
	}
	ip := netip.IPv4Unspecified()
	if h != "" {
		if ip, err = netip.ParseAddr(h); err != nil {
			return nil, fmt.Errorf("routing: listen address %q: host must be an IP: %w", hostPort, err)
		}
	}
	if ip.Zone() != "" {
		return nil, fmt.Errorf("routing: listen address %q: zones are not supported", hostPort)
	}
	ip = ip.Unmap()
	proto := "ip4"
	if ip.Is6() {
		proto = "ip6"
	}
	return ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%d", proto, ip, port))
}

// loadOrCreateKey reads the identity key from dir, creating it on first use.
// The peer ID is derived from it, so keeping it makes restarts keep their ID.
func loadOrCreateKey(dir string) (crypto.PrivKey, error) {
	path := filepath.Join(dir, KeyFile)
	b, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("routing: identity key %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("routing: identity key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("routing: data dir: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	if b, err = crypto.MarshalPrivateKey(k); err != nil {
		return nil, err
	}
	// Write then rename, so a crash never leaves a truncated key behind.
	if err := atomicfile.Write(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("routing: identity key: %w", err)
	}
	return k, nil
}

// syncLRU makes the provider manager's LRU safe to touch from Withdraw; the
// manager itself only uses it under its own lock.
type syncLRU struct {
	mu sync.Mutex
	c  *lru.LRU
}

var _ lru.LRUCache = (*syncLRU)(nil)

func newSyncLRU(size int) (*syncLRU, error) {
	c, err := lru.NewLRU(size, nil)
	if err != nil {
		return nil, err
	}
	return &syncLRU{c: c}, nil
}

func (s *syncLRU) Add(k, v any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Add(k, v)
}

func (s *syncLRU) Get(k any) (any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Get(k)
}

func (s *syncLRU) Contains(k any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Contains(k)
}

func (s *syncLRU) Peek(k any) (any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Peek(k)
}

func (s *syncLRU) Remove(k any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Remove(k)
}

func (s *syncLRU) RemoveOldest() (any, any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.RemoveOldest()
}

func (s *syncLRU) GetOldest() (any, any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.GetOldest()
}

func (s *syncLRU) Keys() []any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Keys()
}

func (s *syncLRU) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Len()
}

func (s *syncLRU) Purge() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.c.Purge()
}

func (s *syncLRU) Resize(n int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Resize(n)
}
