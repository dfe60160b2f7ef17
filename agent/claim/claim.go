// Package claim lets the nodes that miss the same blob at the same moment
// agree, without a coordinator, which one of them fetches it upstream; the
// others stream it from that node as it arrives.
//
// Each node that misses a blob claims it on the DHT (a short-lived record,
// see routing.ClaimEpoch), waits a settle window for the claims of the
// others to land, and lists the claimants. Every node that sees the same
// set picks the same one: the highest rendezvous score of blob and node.
// The failure cases, each bounded:
//   - Nodes whose claims land more than a settle window apart see different
//     sets. The later one usually finds the earlier one already fetching
//     (its blob is advertised in flight) and follows it; if not, both fetch:
//     two upstream fetches, no failed pull.
//   - Two nodes that each pick the other wait for each other's blob in
//     flight, up to the follower's wait, then both fetch upstream.
//   - The chosen node dies, stalls or is slow: its followers' streams stall
//     and they fall back to another source or upstream (agent/mirror).
package claim

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"net/netip"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// Decider runs the agreement for one node.
type Decider struct {
	claims routing.Claims
	settle time.Duration
	log    *slog.Logger
}

// New returns a Decider that waits settle for the claims of others.
func New(claims routing.Claims, settle time.Duration, log *slog.Logger) *Decider {
	if log == nil {
		log = slog.Default()
	}
	return &Decider{claims: claims, settle: settle, log: log}
}

// Decide claims key and returns the registry of the node this one should
// stream it from, or false when this node should fetch it itself. It takes
// the settle window and at most another one to list the claimants.
func (d *Decider) Decide(ctx context.Context, key string) (netip.AddrPort, bool) {
	start := time.Now()
	cctx, cancel := context.WithTimeout(ctx, d.settle)
	if err := d.claims.Claim(cctx, key); err != nil {
		// The claim may still have reached some: go on and list them.
		d.log.Debug("claim did not reach every peer", "key", key, "err", err)
	}
	cancel()
	select {
	case <-ctx.Done():
		return netip.AddrPort{}, false
	case <-time.After(time.Until(start.Add(d.settle))):
	}
	lctx, cancel := context.WithTimeout(ctx, d.settle)
	others, _ := d.claims.Claimants(lctx, key)
	cancel()
	self := d.claims.Self()
	best, bestScore := netip.AddrPort{}, score(key, self)
	for _, c := range others {
		if s := score(key, c.ID); bytes.Compare(s, bestScore) > 0 {
			best, bestScore = c.Addr, s
		}
	}
	d.log.Debug("claim decided", "key", key, "claimants", len(others)+1, "follow", best.String(), "took", time.Since(start))
	return best, best.IsValid()
}

// score is a node's rendezvous score for key: every node computes the
// same order of the same claimants.
func score(key, id string) []byte {
	h := sha256.Sum256([]byte(key + "\x00" + id))
	return h[:]
}
