package registry

import (
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/agent/store"
)

// waitsForImage says whether a peer's request that waited what
// WaitHeader asks for waits on up to what ImageWaitHeader asks for: when
// its blob is one of an image this node fetches for a burst. Its
// containerd asks for that blob once one of its 3 downloads is done, which
// at 20 nodes was later than the short wait; the followers that gave up
// on it agreed on the blob among themselves, and it went upstream twice
// (in half of the 20-node bursts).
func (r *Registry) waitsForImage(req *http.Request, oreq oci.Request) bool {
	return headerWait(req, peerproto.ImageWaitHeader, peerproto.MaxImageWait) > 0 && r.fetchesForImage(oreq)
}

func headerWait(req *http.Request, name string, limit time.Duration) time.Duration {
	d, _ := time.ParseDuration(req.Header.Get(name))
	return min(max(d, 0), limit)
}

// fetchesForImage says whether the blob is named by a manifest this
// node's containerd pulls, of an image whose agreement picked this node
// to fetch it.
func (r *Registry) fetchesForImage(oreq oci.Request) bool {
	if r.claims == nil || r.flights == nil {
		return false
	}
	for _, m := range r.claims.ImageManifests(oreq.Registry + "/" + oreq.Repository) {
		if r.manifests.names(r.flights, m, oreq.Digest) {
			return true
		}
	}
	return false
}

// manifestBlobs remembers what manifests name, each read once from
// containerd's content directory, where it is committed before the blobs
// it names are asked for.
type manifestBlobs struct {
	mu   sync.Mutex
	kids map[digest.Digest][]digest.Digest
}

// A manifest read for this is at most maxManifestRead bytes (a manifest
// of a hundred layers is 20 KB), and at most maxManifestsKept are kept.
const (
	maxManifestRead  = 1 << 20
	maxManifestsKept = 64
)

// names says whether manifest m names dgst. The lock is held while m is
// read, so concurrent followers read it once and hold one copy at most.
func (mb *manifestBlobs) names(flights *store.InFlight, m, dgst digest.Digest) bool {
	mb.mu.Lock()
	defer mb.mu.Unlock()
	kids, ok := mb.kids[m]
	if !ok {
		body, err := flights.Committed(m, maxManifestRead)
		if err != nil {
			return false // not committed yet, or too big: asked again next time
		}
		descs, _ := oci.Children(body) // unparsable: names nothing
		for _, d := range descs {
			kids = append(kids, d.Digest)
		}
		if len(mb.kids) >= maxManifestsKept {
			clear(mb.kids)
		}
		if mb.kids == nil {
			mb.kids = map[digest.Digest][]digest.Digest{}
		}
		mb.kids[m] = kids
	}
	return slices.Contains(kids, dgst)
}
