package fetch

import (
	"encoding/json"
	"net/netip"
	"time"

	lru "github.com/hashicorp/golang-lru"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// A peer that served a manifest almost surely holds what the manifest
// names: its config and layers, or an index's manifests. The DHT lookup
// for those can still miss the resolve timeout when the node is busy
// (on 2 cores, hashing and unpacking the other layers of the same pull),
// and a miss sends the whole blob upstream. So the peer is remembered as
// a hint for each digest the manifest names, and tried when the lookup
// gives no peer in time. A wrong hint costs a 404 from that peer and one
// more resolve wait; the bytes are verified as always.
const (
	maxHints = 4096
	hintTTL  = 10 * time.Minute
)

type hint struct {
	peer netip.AddrPort
	at   time.Time
}

type hints struct{ c *lru.Cache }

func newHints() *hints {
	c, _ := lru.New(maxHints) // fails only for a size <= 0
	return &hints{c: c}
}

// learn records p for every digest the manifest body names.
func (h *hints) learn(p netip.AddrPort, body []byte) {
	var m struct {
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
		Manifests []ocispec.Descriptor `json:"manifests"`
	}
	if json.Unmarshal(body, &m) != nil {
		return
	}
	now := time.Now()
	add := func(d digest.Digest) {
		if d.Validate() == nil {
			h.c.Add(d, hint{peer: p, at: now})
		}
	}
	if m.Config != nil {
		add(m.Config.Digest)
	}
	for _, ds := range [][]ocispec.Descriptor{m.Layers, m.Manifests} {
		for _, d := range ds {
			add(d.Digest)
		}
	}
}

// peer returns the hinted peer for d, if a fresh one is known.
func (h *hints) peer(d digest.Digest) (netip.AddrPort, bool) {
	if d == "" {
		return netip.AddrPort{}, false
	}
	v, ok := h.c.Get(d)
	if !ok {
		return netip.AddrPort{}, false
	}
	hn := v.(hint)
	if time.Since(hn.at) > hintTTL {
		h.c.Remove(d)
		return netip.AddrPort{}, false
	}
	return hn.peer, true
}
