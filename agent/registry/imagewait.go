package registry

import (
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/store"
)

// imageGroup is what the nodes of a burst agree on an image under (see
// agent/claim): its registry and repository, which its tag, manifests and
// blobs share.
func imageGroup(oreq oci.Request) string { return oreq.Registry + "/" + oreq.Repository }

// headerWait is the wait a peer's header asks for, within limit.
func headerWait(req *http.Request, name string, limit time.Duration) time.Duration {
	d, _ := time.ParseDuration(req.Header.Get(name))
	return min(max(d, 0), limit)
}

// pullsForImage says whether a manifest of the blob's repository that
// this node's containerd pulls names the blob: a peer that asks with
// ImageWaitHeader is then waited for longer than WaitHeader asks. That
// containerd asks for the blob once one of its 3 downloads is done, at 20
// nodes later than the short wait, and then holds it in flight, whether
// this node fetches it for the image or follows the node that does.
// Followers that gave up on it agreed on the blob among themselves, and it
// went upstream twice (in half of the 20-node bursts).
func (r *Registry) pullsForImage(oreq oci.Request) bool {
	if r.claims == nil || r.flights == nil {
		return false
	}
	for _, m := range r.claims.ImageManifests(imageGroup(oreq)) {
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
// of a hundred layers is 20 KB), and at most maxManifestsKept are kept:
// with the most digests such manifests hold, about 15 MB.
const (
	maxManifestRead  = 1 << 20
	maxManifestsKept = 16
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
