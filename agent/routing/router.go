// Package routing finds which peers hold a key (a digest or a tag key) and
// tells peers what this node holds.
package routing

import (
	"context"
	"errors"
	"net/netip"
	"slices"

	"github.com/ipfs/go-cid"
	ds "github.com/ipfs/go-datastore"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"
)

// Router announces keys and looks up the peers that announced them.
type Router interface {
	// Ready reports whether the router can answer lookups: a lone node is
	// ready, a node with bootstrap peers once it has joined one of them.
	Ready(ctx context.Context) (bool, error)
	// Lookup streams the registry addresses of up to count peers (never this
	// node) that hold key. The channel is closed when the lookup ends or ctx is done.
	Lookup(ctx context.Context, key string, count int) (<-chan netip.AddrPort, error)
	// Advertise announces that this node holds keys.
	Advertise(ctx context.Context, keys []string) error
	// Withdraw stops announcing keys.
	Withdraw(ctx context.Context, keys []string) error
}

// Peer is a connected peer, for status pages and metrics.
type Peer struct {
	ID      string
	Address string
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

	// kad-dht's provider manager has no delete, so this edits its state
	// directly and relies on two of its internals, both checked by
	// TestProviderManagerLayout: the datastore key of a record
	// (providerKey) and the key of its read cache (the multihash bytes as
	// a string).
	var errs []error
	for _, k := range keys {
		mh := keyCID(k).Hash()
		if err := p.dstore.Delete(ctx, providerKey(mh, p.host.ID())); err != nil && !errors.Is(err, ds.ErrNotFound) {
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

// keyCID maps a key (digest or tag key) to a CIDv1, raw codec, whose
// multihash is sha2-256 of the key string.
func keyCID(key string) cid.Cid {
	mh, err := multihash.Sum([]byte(key), multihash.SHA2_256, -1)
	if err != nil {
		panic(err) // sha2-256 is always available
	}
	return cid.NewCidV1(cid.Raw, mh)
}
