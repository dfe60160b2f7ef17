package routing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pb "github.com/libp2p/go-libp2p-kad-dht/pb"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
)

const (
	// ProtocolPrefix keeps fleetmirror's DHT apart from the public IPFS one:
	// peers speaking /ipfs/kad never mix with ours.
	ProtocolPrefix = "/fleetmirror"

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

// NewP2P starts a libp2p host and DHT. The host listens on listenAddr over
// TCP (IPv4 or IPv6, e.g. "10.0.0.5:5001" or "[fd00::5]:5001"); its host
// must be an IP: prefer the node's own IP over 0.0.0.0, which would also
// advertise bridge and loopback addresses to peers. registryPort is the port
// every agent serves its OCI registry on; Lookup returns peer IPs with it.
// id is the peer identity. NewP2P never waits for bootstrap, which runs in
// the background until ctx is cancelled or Close is called.
func NewP2P(ctx context.Context, listenAddr string, registryPort uint16, id Identity, opts ...Option) (*P2P, error) {
	cfg := defaultConfig()
	cfg.listenAddr, cfg.registryPort, cfg.identity = listenAddr, registryPort, id
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	h, err := newHost(cfg)
	if err != nil {
		return nil, err
	}
	p, err := newP2P(cfg, h)
	if err != nil {
		_ = h.Close()
		return nil, err
	}
	p.start(ctx)
	return p, nil
}

// newHost starts a libp2p host with only what a private cluster needs, so
// the host never sends traffic on its own: TCP only (no
// QUIC/WebRTC/WebTransport), no relay, no NAT port mapping (that is opt-in
// via NATPortMap, which we never set), no hole punching or AutoRelay (opt-in
// too), no AutoNATv2 (opt-in); AutoNAT v1 only probes public addresses and is
// pinned to a fixed reachability so it never starts probing. Metrics are off
// so several hosts per process (tests) do not collide in the global
// Prometheus registry.
func newHost(cfg p2pConfig) (host.Host, error) {
	listen, err := listenMultiaddr(cfg.listenAddr)
	if err != nil {
		return nil, err
	}
	key, err := cfg.identity.load()
	if err != nil {
		return nil, err
	}
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
	if cfg.pskSet {
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
	return h, nil
}

// newP2P runs a DHT on h over a bounded provider store and subscribes to
// newly identified peers. The caller closes h on error.
func newP2P(cfg p2pConfig, h host.Host) (*P2P, error) {
	log := cfg.logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dstore := newBoundedStore(dssync.MutexWrap(ds.NewMapDatastore()), h.ID(), maxRecordsPerPeer)
	cache, err := newSyncLRU(providerCacheSize)
	if err != nil {
		return nil, err
	}
	d, err := newDHT(h, dstore, cache, cfg.provideValidity)
	if err != nil {
		return nil, fmt.Errorf("routing: dht: %w", err)
	}
	msgr, err := pb.NewProtocolMessenger(d.MessageSender())
	var sub event.Subscription
	if err == nil {
		sub, err = h.EventBus().Subscribe(new(event.EvtPeerIdentificationCompleted))
	}
	if err != nil {
		_ = d.Close()
		return nil, fmt.Errorf("routing: %w", err)
	}
	return &P2P{
		cfg:       cfg,
		log:       log.With("component", "p2p"),
		host:      h,
		dht:       d,
		msgr:      msgr,
		dstore:    dstore,
		cache:     cache,
		sub:       sub,
		keys:      map[string]cid.Cid{},
		pending:   map[peer.ID]struct{}{},
		pendingCh: make(chan struct{}, 1),
	}, nil
}

// newDHT runs kad-dht in server mode under our protocol prefix, keeping
// provider records in dstore (read through cache) for validity.
func newDHT(h host.Host, dstore ds.Batching, cache *syncLRU, validity time.Duration) (*dht.IpfsDHT, error) {
	return dht.New(h,
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
}

// start ties p's life to ctx (cancelling it closes p) and starts the
// background loops.
func (p *P2P) start(ctx context.Context) {
	p.ctx, p.cancel = context.WithCancel(context.WithoutCancel(ctx))
	p.stopAfter = context.AfterFunc(ctx, func() { _ = p.Close() })
	p.wg.Go(p.watchPeers)
	p.wg.Go(p.pushLoop)
	p.wg.Go(p.reprovideLoop)
	if p.cfg.bootstrapper != nil {
		p.wg.Go(p.bootstrapLoop)
	}
	p.log.Info("p2p router started", "id", p.host.ID().String(), "addrs", p.host.Addrs())
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
