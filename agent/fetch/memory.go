package fetch

// What the mirror remembers for a while: peers that lied about a digest,
// and manifests it verified lately.

import (
	"net/netip"
	"slices"
	"time"

	lru "github.com/hashicorp/golang-lru"
	"github.com/opencontainers/go-digest"
)

// badPeers remembers peers that sent a digest's bytes wrong, so the retry
// containerd makes after the cut response goes to another source. Several
// peers may have contributed to one wrong blob; all of them are skipped,
// since which one lied cannot be told.
const (
	maxBad = 1024
	badTTL = 10 * time.Minute
)

type badEntry struct {
	peers []netip.AddrPort
	at    time.Time
}

type badPeers struct{ c *lru.Cache }

func newBadPeers() *badPeers {
	c, _ := lru.New(maxBad) // fails only for a size <= 0
	return &badPeers{c: c}
}

func (b *badPeers) add(d digest.Digest, peers []netip.AddrPort) {
	e := badEntry{at: time.Now()}
	if v, ok := b.c.Get(d); ok && time.Since(v.(badEntry).at) < badTTL {
		e.peers = v.(badEntry).peers
	}
	for _, p := range peers {
		if !slices.Contains(e.peers, p) {
			e.peers = append(e.peers, p)
		}
	}
	b.c.Add(d, e)
}

// peers returns the peers that sent d wrong lately.
func (b *badPeers) peers(d digest.Digest) []netip.AddrPort {
	if d == "" {
		return nil
	}
	v, ok := b.c.Get(d)
	if !ok {
		return nil
	}
	e := v.(badEntry)
	if time.Since(e.at) > badTTL {
		b.c.Remove(d)
		return nil
	}
	return e.peers
}

func (b *badPeers) has(d digest.Digest, p netip.AddrPort) bool {
	return slices.Contains(b.peers(d), p)
}

// recentManifests keeps manifests verified in the last minute, so the GET
// by digest that follows containerd's HEAD by tag does not fetch again.
const (
	maxRecentManifests = 256
	recentManifestTTL  = time.Minute
)

type recentManifest struct {
	man Manifest
	at  time.Time
}

type recentManifests struct{ c *lru.Cache }

func newRecentManifests() *recentManifests {
	c, _ := lru.New(maxRecentManifests) // fails only for a size <= 0
	return &recentManifests{c: c}
}

func (r *recentManifests) add(man Manifest) {
	r.c.Add(man.Descriptor.Digest, recentManifest{man: man, at: time.Now()})
}

func (r *recentManifests) get(d digest.Digest) (Manifest, bool) {
	if d == "" {
		return Manifest{}, false
	}
	v, ok := r.c.Get(d)
	if !ok || time.Since(v.(recentManifest).at) > recentManifestTTL {
		return Manifest{}, false
	}
	return v.(recentManifest).man, true
}
