package claim

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// image is this node's part in the agreement on one image: which node
// fetches its blobs, this one or another.
type image struct {
	key   string        // the manifest key it ran under
	began time.Time     // when it began
	used  time.Time     // when it began, or its answer was last used
	done  chan struct{} // closed once decided
	// Set once done is closed.
	self    bool
	fetcher netip.AddrPort // the node to follow, when not self
	// The manifests this node's containerd missed in the group since the
	// agreement began, by digest: of the images it pulls, whose blobs it
	// will ask for.
	manifests []digest.Digest
}

// maxManifests bounds the manifests an image's agreement remembers: a
// pull misses an index and its platform's manifest, a node may pull a few
// tags of one repository at once.
const maxManifests = 8

// note remembers key if it is a manifest's digest. d.mu is held.
func (im *image) note(key string) {
	dg, err := digest.Parse(key)
	if err != nil || slices.Contains(im.manifests, dg) || len(im.manifests) >= maxManifests {
		return
	}
	im.manifests = append(im.manifests, dg)
}

// fetcherFor is how long the answer of an image's agreement is used
// after its last use: a burst's pulls of one image ask for all its blobs
// within it. A claim counts as long.
const fetcherFor = 30 * time.Second

// beginOnce is how long after an agreement on an image began a manifest
// miss of its repository under a digest, or under the same key, starts no
// other one: one pull misses its tag, then its manifest (and, for an
// index, its platform's manifest), each under another key, and under load
// the first agreement can take a second. A new tag starts a new one.
const beginOnce = 10 * time.Second

// maxGroups bounds the images remembered; past it a manifest miss starts
// no agreement, and its blobs are agreed on one by one.
const maxGroups = 1024

// Begin starts the agreement on an image ahead of its blobs: group is its
// repository, key its tag or manifest digest, which all nodes of a burst
// miss alike. The agreement runs while containerd fetches the manifest and
// the config from upstream; a blob's Decide waits for it. The node it
// picks fetches the image's blobs without another agreement, and the
// others follow that one (ImageFetcher).
func (d *Decider) Begin(key, group string) {
	d.mu.Lock()
	if old := d.images[group]; old != nil {
		select {
		case <-old.done:
		default:
			old.note(key)
			d.mu.Unlock()
			return // under way
		}
		if (key == old.key || strings.HasPrefix(key, "sha256:")) && time.Since(old.began) < beginOnce {
			old.note(key)
			d.mu.Unlock()
			return // the same pull
		}
	}
	if !d.roomForImage() {
		d.mu.Unlock()
		return
	}
	now := time.Now()
	im := &image{key: key, began: now, used: now, done: make(chan struct{})}
	im.note(key)
	d.images[group] = im
	d.mu.Unlock()
	go func() {
		// decide's waits are each bounded by the settle window; this
		// bounds them all.
		ctx, cancel := context.WithTimeout(context.Background(), d.bound())
		defer cancel()
		leader, follow, burst := d.decide(ctx, key, group)
		if !follow && burst {
			// A node that picked itself takes the second look before the
			// image's blobs go upstream: at 20 nodes on 2 cores claims miss
			// the settle window, and two nodes that each fetch a whole
			// image cost the upstream the image twice. Unloaded, the
			// manifest and the config take longer than it.
			leader, follow = d.lookAgain(ctx, key, group)
		}
		d.mu.Lock()
		// A node that saw nobody else gets no answer: its blobs are agreed
		// on one by one, so a lone pull pays the quiet window only, and a
		// node that saw nobody because claims came late does not fetch a
		// whole image besides the burst's fetcher.
		im.self, im.fetcher = !follow && burst, leader
		if ctx.Err() != nil {
			// Out of time: what it decided rests on lists that did not
			// finish, and a node that took itself for the fetcher would
			// fetch the whole image besides the real one.
			im.self, im.fetcher = false, netip.AddrPort{}
		}
		d.mu.Unlock()
		close(im.done)
	}()
}

// roomForImage drops the answers no longer used, and says whether there is
// room for another. d.mu is held.
func (d *Decider) roomForImage() bool {
	if len(d.images) < maxGroups {
		return true
	}
	for g, im := range d.images {
		select {
		case <-im.done:
			if time.Since(im.used) >= fetcherFor {
				delete(d.images, g)
			}
		default:
		}
	}
	return len(d.images) < maxGroups
}

// awaitBegun waits for an agreement Begin started on group.
func (d *Decider) awaitBegun(ctx context.Context, group string) {
	d.mu.Lock()
	im := d.images[group]
	d.mu.Unlock()
	if im == nil {
		return
	}
	select {
	case <-im.done:
	case <-ctx.Done():
	}
}

// answer is the decided agreement on group, if fresh; its use keeps it so.
func (d *Decider) answer(group string) (self bool, fetcher netip.AddrPort, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	im := d.images[group]
	if im == nil || time.Since(im.used) >= fetcherFor {
		return false, netip.AddrPort{}, false
	}
	select {
	case <-im.done:
	default:
		return false, netip.AddrPort{}, false
	}
	im.used = time.Now()
	return im.self, im.fetcher, true
}

// fetchesImage says whether the agreement on group picked this node.
func (d *Decider) fetchesImage(group string) bool {
	self, _, ok := d.answer(group)
	return ok && self
}

// ImageManifests are the manifests, by digest, of the images in group
// this node's containerd pulls (those it missed since the agreement on
// group began): it will ask for each blob they name, and hold that blob in
// flight as it fetches it or follows the node that does, so a node that
// follows this one may wait for it.
func (d *Decider) ImageManifests(group string) []digest.Digest {
	d.mu.Lock()
	defer d.mu.Unlock()
	im := d.images[group]
	if im == nil || time.Since(im.used) >= fetcherFor {
		return nil
	}
	return slices.Clone(im.manifests)
}

// ImageFetcher is the node the agreement on group (see Begin) picked to
// fetch the image's blobs, after waiting for it to end; false when it
// picked this node or there was none. The node it names may not fetch a
// given blob (a later image of the repository it does not pull), so ask it
// briefly, and decide the blob if it does not answer.
func (d *Decider) ImageFetcher(ctx context.Context, group string) (netip.AddrPort, bool) {
	d.awaitBegun(ctx, group)
	self, f, ok := d.answer(group)
	return f, ok && !self && f.IsValid()
}
