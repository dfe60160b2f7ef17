package routing

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	kb "github.com/libp2p/go-libp2p-kbucket"
)

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
