// Package claim lets the nodes that miss the same blob at the same moment
// agree, without a coordinator, which one of them fetches it upstream; the
// others stream it from that node as it arrives.
//
// A node that misses a blob claims it on the DHT ("want", a short-lived
// record, see routing.ClaimEpoch) and looks again after a quiet window (a
// fifth of the settle window). If a node already fetches it, it follows
// that one. If nobody else wants it, it fetches it itself: a lone miss
// costs the quiet window only. If others want it too, it is a burst: it
// waits out the settle window for the rest to claim, follows a fetcher if
// one appeared meanwhile, and else picks among the claimants the one with
// the highest rendezvous score of image (the blob's repository) and node,
// as every node that sees the same claimants does: one node fetches all
// layers of an image (see Decide for why). The fetcher announces that it
// fetches ("fetch" claim), so nodes that come later follow it.
// On a busy node claims can miss the settle window, so two nodes that did
// not see each other may both pick themselves: each fetcher looks at the
// fetch claims once more a settle window later, and yields to one of
// higher score; and a node that listed the claims slowly follows a node
// that announced it fetches meanwhile. A node follows one of higher score
// or one that announced it fetches, and a node that announced it follows
// only another that did, of higher score: no two nodes wait on each other.
//
// The agreement on an image runs once, ahead of its blobs: Begin starts it
// under the image's tag or manifest when containerd misses it, so it runs
// while containerd fetches the manifest and the config from upstream. The
// node it picks fetches each of the image's blobs as its containerd asks,
// announcing it at once; the others ask that node first (ImageFetcher),
// and decide the blob as above only if it does not start on it. One that
// then picks itself (its containerd asked long before the image's
// fetcher's did) fetches that blob only; the image's fetcher fetches it
// too, since it follows nobody (see fetchForImage).
//
// The failure cases, each bounded:
//   - Claims that do not reach each other even in the second look make two
//     nodes fetch: two upstream fetches, no failed pull.
//   - The image's fetcher does not fetch a blob (its answer is stale: a
//     later image of the repository it does not pull): the node that asked
//     it loses up to registry.imageFollowWait (3 s), then decides the blob.
//     A blob a manifest it pulls names (ImageManifests) is waited for up to
//     peerproto.MaxImageWait: its containerd asks for it once one of its 3
//     downloads is done. A node that follows another for the image is
//     waited for so too, as it holds the blob once it follows it; two
//     nodes whose answers named each other would each hold the other that
//     long, then go on as above.
//     A node that has the blob in flight but no bytes yet is waited for
//     up to peerproto.FollowWait, as a chosen node is.
//   - The chosen node dies, stalls or is slow: its followers wait for its
//     first bytes up to peerproto.FollowWait and go upstream; once bytes flow,
//     a stream that stalls falls back to another source or upstream
//     (agent/fetch).
package claim

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// Decider runs the agreement for one node.
type Decider struct {
	claims routing.Claims
	settle time.Duration
	log    *slog.Logger

	mu     sync.Mutex
	images map[string]*image // by group: the agreements on images (image.go)
}

// New returns a Decider that waits settle for the claims of others.
func New(claims routing.Claims, settle time.Duration, log *slog.Logger) *Decider {
	if log == nil {
		log = slog.Default()
	}
	return &Decider{claims: claims, settle: settle, log: log, images: map[string]*image{}}
}

// Decide claims key and returns the registry of the node this one should
// stream it from, or false when this node should fetch it itself. It takes
// the quiet window when nobody else wants the key, and the settle window
// (and one more to list claims) in a burst.
//
// Claimants are ranked by their score for group, not for key: the blobs of
// one image (group names its repository) get the same fetcher, and other
// images other ones. A fetcher per blob would deadlock a burst on
// containerd 2.x: its pull holds at most 3 requests (max_concurrent_downloads)
// and lets go of one between the mirror's 404 and the upstream request, so
// a queued request for another layer takes it, to wait on another node; a
// node fetching one layer then holds all its slots waiting on nodes that
// fetch the others, and they on it, until the follow waits run out. A node
// that fetches every layer of an image never waits on another node.
func (d *Decider) Decide(ctx context.Context, key, group string) (netip.AddrPort, bool) {
	if group == "" {
		group = key
	}
	d.awaitBegun(ctx, group)
	ctx, cancel := context.WithTimeout(ctx, d.bound())
	defer cancel()
	leader, follow, look := d.decide(ctx, key, group)
	if look {
		return d.lookAgain(ctx, key, group)
	}
	return leader, follow
}

// bound is the longest an agreement takes: its waits are settle windows,
// but a list no peer answers is asked again for longer. Past it the node
// fetches the blob itself.
func (d *Decider) bound() time.Duration { return 20 * d.settle }

// decide is Decide without the second look: look says the node picked
// itself in a burst and should look again (lookAgain) before it fetches.
func (d *Decider) decide(ctx context.Context, key, group string) (leader netip.AddrPort, follow, look bool) {
	start := time.Now()
	if d.fetchesImage(group) {
		d.fetchForImage(ctx, key, group, start)
		return netip.AddrPort{}, false, false
	}
	d.claim(ctx, routing.Want, key)
	quiet := d.settle / 5
	if !sleep(ctx, time.Until(start.Add(quiet))) {
		return netip.AddrPort{}, false, false
	}
	fetchers, others := d.lists(ctx, key)
	if f, ok := pick(fetchers, group); ok {
		return f.Addr, true, false
	}
	if len(others) > 0 {
		// A burst: let the others' claims land, then decide as they will.
		if !sleep(ctx, time.Until(start.Add(d.settle))) {
			return netip.AddrPort{}, false, false
		}
		fetchers, others = d.lists(ctx, key)
		if f, ok := pick(fetchers, group); ok {
			return f.Addr, true, false
		}
	}
	best, bestScore := netip.AddrPort{}, score(group, d.claims.Self())
	for _, c := range others {
		if s := score(group, c.ID); bytes.Compare(s, bestScore) > 0 {
			best, bestScore = c.Addr, s
		}
	}
	d.log.Debug("claim decided", "key", key, "claimants", len(others)+1, "follow", best.String(), "took", time.Since(start))
	if best.IsValid() {
		return best, true, false
	}
	if len(others) > 0 {
		// Listing the claims took a while on a busy node: a node that
		// decided meanwhile is followed, as a late node would.
		if f, ok := d.fetcher(ctx, key, group); ok {
			return f, true, false
		}
	}
	d.claim(ctx, routing.Fetch, key)
	return netip.AddrPort{}, false, len(others) > 0
}

// lookAgain is a burst's fetcher's second look. On a busy node a claim can
// miss the settle window, and a node that did not see a better claimant
// picks itself: in 20-node bursts half the layers had two fetchers. Each
// fetcher looks once more; the one of the highest score stays, the others
// follow it, as nodes that come later do. It costs a burst's fetcher one
// more settle window before its containerd goes upstream.
func (d *Decider) lookAgain(ctx context.Context, key, group string) (netip.AddrPort, bool) {
	if !sleep(ctx, d.settle) {
		return netip.AddrPort{}, false
	}
	f, ok := d.best(ctx, routing.Fetch, key, group)
	if !ok || bytes.Compare(score(group, f.ID), score(group, d.claims.Self())) <= 0 {
		return netip.AddrPort{}, false
	}
	d.log.Debug("claim yielded to a fetcher of higher score", "key", key, "follow", f.Addr.String())
	return f.Addr, true
}

// fetchForImage decides a blob of an image whose agreement picked this
// node: it fetches it, announcing it, and follows nobody, even a node that
// announced the blob first (a node that gave up on this one, or a second
// fetcher of the image): the nodes that wait on this one may wait on it
// with all of containerd's 3 download slots, so if it waited on them in
// turn, neither would progress until the follow wait ran out. At worst the
// blob is fetched twice.
func (d *Decider) fetchForImage(ctx context.Context, key, group string, start time.Time) {
	// The announcements go out while containerd starts upstream.
	go d.claim(context.WithoutCancel(ctx), routing.Fetch, key)
	go d.claim(context.WithoutCancel(ctx), routing.Want, key)
	d.log.Debug("claim decided: this node fetches the image", "key", key, "group", group, "took", time.Since(start))
}

// fetcher is the node that announced it fetches key, if any; of several,
// the one every node picks.
func (d *Decider) fetcher(ctx context.Context, key, group string) (netip.AddrPort, bool) {
	f, ok := d.best(ctx, routing.Fetch, key, group)
	return f.Addr, ok
}

// best is the other claimant of the kind on key with the highest score
// for group.
func (d *Decider) best(ctx context.Context, kind routing.ClaimKind, key, group string) (routing.Claimant, bool) {
	return pick(d.list(ctx, kind, key), group)
}

// pick is the claimant with the highest score for group.
func pick(cs []routing.Claimant, group string) (routing.Claimant, bool) {
	if len(cs) == 0 {
		return routing.Claimant{}, false
	}
	best := cs[0]
	for _, c := range cs[1:] {
		if bytes.Compare(score(group, c.ID), score(group, best.ID)) > 0 {
			best = c
		}
	}
	return best, true
}

// lists lists the fetchers and the wanters of key at once: each list is a
// round trip to the peers, tens of milliseconds on a node busy pulling,
// and the agreement is on the fetcher's way to its first byte.
func (d *Decider) lists(ctx context.Context, key string) (fetchers, wanters []routing.Claimant) {
	var wg sync.WaitGroup
	wg.Go(func() { fetchers = d.list(ctx, routing.Fetch, key) })
	wanters = d.list(ctx, routing.Want, key)
	wg.Wait()
	return fetchers, wanters
}

func (d *Decider) claim(ctx context.Context, kind routing.ClaimKind, key string) {
	cctx, cancel := context.WithTimeout(ctx, d.settle)
	defer cancel()
	if err := d.claims.Claim(cctx, kind, key); err != nil {
		// It may still have reached some.
		d.log.Debug("claim did not reach every peer", "kind", kind, "key", key, "err", err)
	}
}

// list lists the claimants of the kind on key, within a settle window, or
// five if no peer answered in the first: a node that hears nobody must
// not take itself for alone.
func (d *Decider) list(ctx context.Context, kind routing.ClaimKind, key string) []routing.Claimant {
	lctx, cancel := context.WithTimeout(ctx, d.settle)
	defer cancel()
	cs, err := d.claims.Claimants(lctx, kind, key)
	if errors.Is(err, routing.ErrNoAnswer) {
		lctx, cancel := context.WithTimeout(ctx, 5*d.settle)
		defer cancel()
		cs, err = d.claims.Claimants(lctx, kind, key)
		if err != nil {
			d.log.Debug("no peer answered a list of claims", "kind", kind, "key", key)
		}
	}
	return cs
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// score is a node's rendezvous score for a group: every node computes the
// same order of the same claimants.
func score(key, id string) []byte {
	h := sha256.Sum256([]byte(key + "\x00" + id))
	return h[:]
}
