package routing

import (
	"context"
	"slices"
	"time"

	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/peer"
)

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
