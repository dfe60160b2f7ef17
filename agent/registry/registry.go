// Package registry is the agent's read-only OCI distribution endpoint: it
// serves what the node's containerd holds, and for the node's own
// containerd, what peers hold.
package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/claim"
	"github.com/fleetmirror/fleetmirror/agent/fetch"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/agent/policy"
	"github.com/fleetmirror/fleetmirror/agent/store"
)

// Store is what the registry needs of the node's content store.
type Store interface {
	// Resolve returns the manifest digest a tag key points at.
	Resolve(ctx context.Context, tagKey string) (digest.Digest, error)
	// Descriptor returns the media type and size of content the node holds.
	Descriptor(ctx context.Context, dgst digest.Digest) (ocispec.Descriptor, error)
	// Open returns the content's bytes; the caller closes it.
	Open(ctx context.Context, dgst digest.Digest) (io.ReadSeekCloser, error)
	// Keys lists the tag keys and digests the node can serve.
	Keys() []string
}

// Registry serves the distribution API.
type Registry struct {
	store     Store
	fetcher   *fetch.Fetcher
	metrics   *metrics.Metrics
	log       *slog.Logger
	ready     func(context.Context) error
	flights   *store.InFlight
	held      Holder
	claims    *claim.Decider
	policy    *policy.Policy
	limit     *limiter
	follows   following
	manifests manifestBlobs // of the images this node's containerd pulls
}

// following counts the blobs this node waits for from the node it agreed
// to follow. Such a blob is not advertised yet (the node has no source
// until the first bytes come), but a node whose view of the claimants
// differed may have picked this one: it is served in flight from here as
// it arrives, instead of a 404 that would send it upstream. A node follows
// one of higher score or one that announced it fetches, and a node that
// announced it follows only another that did, of higher score, so these
// waits form no cycle (see agent/claim).
type following struct {
	mu sync.Mutex
	n  map[digest.Digest]int
}

func (f *following) add(d digest.Digest, delta int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.n == nil {
		f.n = map[digest.Digest]int{}
	}
	if f.n[d] += delta; f.n[d] <= 0 {
		delete(f.n, d)
	}
}

func (f *following) has(d digest.Digest) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n[d] > 0
}

// followWait is how long a node that agreed to follow another asks it to
// wait for the blob to appear in flight: nodes decide at different moments
// on a busy machine (up to a second apart in a 20-node burst), and the
// fallback is upstream. The wait for its first bytes is peerproto.FollowWait.
const followWait = peerproto.MaxWait

// WithClaims makes nodes that miss a blob at the same moment agree on one
// of them fetching it upstream (see agent/claim).
func WithClaims(d *claim.Decider) Option { return func(r *Registry) { r.claims = d } }

// Holder keeps blobs this node's containerd is fetching advertised as in
// flight, so peers can stream them as they grow.
type Holder interface {
	Hold(key string)
	Holding(key string) bool
}

// WithInFlight shares blobs still being written: a blob the node's
// containerd asked this agent for (and then fetched from peers or
// upstream) is held in flight by h, and peers are served its bytes from
// flights as they arrive.
func WithInFlight(flights *store.InFlight, h Holder) Option {
	return func(r *Registry) { r.flights, r.held = flights, h }
}

// WithPolicy keeps private registries' content and upstream-only tags off
// the peer network: such requests get a 404 at once, so containerd asks
// the registry itself, with its own credentials.
func WithPolicy(p *policy.Policy) Option { return func(r *Registry) { r.policy = p } }

// WithMaxRequests bounds the requests served at once to n in total and
// n/ClientShare (at least 1) per client IP; DefaultMaxRequests without it.
func WithMaxRequests(n int) Option {
	return func(r *Registry) { r.limit = newLimiter(n, max(n/ClientShare, 1)) }
}

// Option configures a Registry.
type Option func(*Registry)

// WithFetcher fetches what the node lacks from peers; without it the
// registry serves only local content.
func WithFetcher(f *fetch.Fetcher) Option { return func(r *Registry) { r.fetcher = f } }

// WithMetrics records requests in m.
func WithMetrics(m *metrics.Metrics) Option { return func(r *Registry) { r.metrics = m } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(r *Registry) { r.log = l } }

// WithReadiness sets the check behind /readyz.
func WithReadiness(f func(context.Context) error) Option { return func(r *Registry) { r.ready = f } }

// New returns a registry serving from st.
func New(st Store, opts ...Option) (*Registry, error) {
	if st == nil {
		return nil, errors.New("registry: a store is required")
	}
	r := &Registry{store: st, log: slog.Default(), ready: func(context.Context) error { return nil }}
	for _, o := range opts {
		o(r)
	}
	if r.limit == nil {
		WithMaxRequests(DefaultMaxRequests)(r)
	}
	if r.limit.total < 1 {
		return nil, fmt.Errorf("registry: at least 1 request at a time, got %d", r.limit.total)
	}
	if r.metrics == nil {
		r.metrics = metrics.New(func() int { return 0 })
	}
	return r, nil
}

func (r *Registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if r.serveProbe(w, req) || !admissible(w, req) {
		return
	}
	release, ok := r.limit.acquire(w, req)
	if !ok {
		return
	}
	defer release()
	if l, ok, err := oci.ParseList(req.URL.Path, req.URL.Query().Get("ns")); ok {
		if err != nil {
			writeParseError(w, err)
			return
		}
		r.serveList(w, req, l)
		return
	}
	oreq, err := oci.ParseRequest(req.URL.Path, req.URL.Query().Get("ns"))
	if err != nil {
		writeParseError(w, err)
		return
	}
	r.serveContent(w, req, oreq)
}

// serveProbe answers the liveness and readiness probes and the API
// version check, and reports whether it did.
func (r *Registry) serveProbe(w http.ResponseWriter, req *http.Request) bool {
	switch req.URL.Path {
	case "/livez":
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "ok\n")
	case "/readyz":
		if err := r.ready(req.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return true
		}
		io.WriteString(w, "ok\n")
	case "/v2", "/v2/":
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		if !readOnly(w, req) {
			return true
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, "{}")
	default:
		return false
	}
	return true
}

// admissible refuses, before the request takes a place in the limiter,
// what this read-only mirror never serves: other methods than GET and
// HEAD, paths outside the distribution API, and more than one short Range.
func admissible(w http.ResponseWriter, req *http.Request) bool {
	if !readOnly(w, req) {
		return false
	}
	if !strings.HasPrefix(req.URL.Path, "/v2/") {
		writeError(w, http.StatusNotFound, "NOT_FOUND", "not a distribution API path: "+req.URL.Path)
		return false
	}
	if rng := req.Header.Values("Range"); len(rng) > 1 || (len(rng) == 1 && len(rng[0]) > maxRangeHeader) {
		writeError(w, http.StatusBadRequest, "RANGE_INVALID", fmt.Sprintf(
			"one Range header of at most %d bytes, e.g. bytes=1048576-, is served here", maxRangeHeader))
		return false
	}
	return true
}

// serveContent answers a request for a manifest or blob: from the node's
// store, to a peer from what is in flight, or else from peers; a peer's
// request is never forwarded.
func (r *Registry) serveContent(w http.ResponseWriter, req *http.Request, oreq oci.Request) {
	if !r.policy.Shared(oreq) {
		r.metrics.Requests.WithLabelValues(r.metrics.RegistryLabel(oreq.Registry), string(oreq.Kind), metrics.OutcomeMiss).Inc()
		writeError(w, http.StatusNotFound, notFoundCode(oreq), oreq.Registry+"/"+oreq.Repository+
			" resolves at its registry only (--private-registries or --upstream-tags): ask the registry")
		return
	}
	if oreq.Tag != "" && oreq.Registry == "" {
		// Without ns a tag names no registry: only this node's store can
		// say which image it means, and peers are never asked.
		r.serveUnqualifiedTag(w, req, oreq)
		return
	}
	if r.serveLocal(w, req, oreq) {
		return
	}
	fromPeer := req.Header.Get(peerproto.PeerHeader) != ""
	if fromPeer && r.serveInFlight(w, req, oreq) {
		return
	}
	if fromPeer || r.fetcher == nil {
		// Never forward a peer's request: it would bounce between agents.
		notFound(w, oreq)
		return
	}
	if oreq.Kind == oci.KindBlob && req.Method == http.MethodGet {
		r.streamPeer(w, req, oreq)
		return
	}
	r.servePeer(w, req, oreq)
}

// readOnly refuses every method but GET and HEAD.
func readOnly(w http.ResponseWriter, req *http.Request) bool {
	if req.Method == http.MethodGet || req.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "this mirror is read-only: "+req.Method+" is not supported")
	return false
}

// serveLocal serves content from the node's store and reports whether it
// answered: with the content, or with a 404 for a digest the node holds
// that is not a manifest, asked for as one.
func (r *Registry) serveLocal(w http.ResponseWriter, req *http.Request, oreq oci.Request) bool {
	ctx := req.Context()
	dgst := oreq.Digest
	if dgst == "" {
		key := oreq.Key()
		if key == "" {
			return false
		}
		d, err := r.store.Resolve(ctx, key)
		if err != nil {
			return false
		}
		dgst = d
	}
	desc, err := r.store.Descriptor(ctx, dgst)
	if err != nil {
		return false
	}
	if oreq.Kind == oci.KindManifest && !oci.IsManifestType(desc.MediaType) {
		// A layer or config served as a manifest misleads clients; content
		// is addressed by digest, so no peer holds it as a manifest either.
		writeError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", oreq.Repository+"@"+dgst.String()+
			" is not a manifest (media type "+desc.MediaType+"): fetch it from /v2/"+oreq.Repository+"/blobs/"+dgst.String())
		return true
	}
	rc, err := r.store.Open(ctx, dgst)
	if err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			r.log.ErrorContext(ctx, "opening content", "digest", dgst, "err", err)
		}
		return false
	}
	defer rc.Close()
	fromPeer := req.Header.Get(peerproto.PeerHeader) != ""
	if !fromPeer {
		r.metrics.Requests.WithLabelValues(r.metrics.RegistryLabel(oreq.Registry), string(oreq.Kind), metrics.OutcomeLocal).Inc()
	}
	w.Header().Set(peerproto.SourceHeader, peerproto.SourceLocal)
	cw := &countingWriter{ResponseWriter: w, counter: r.metrics.ServedBytes.WithLabelValues(metrics.OutcomeLocal)}
	if fromPeer {
		cw.counter = r.metrics.ServedToPeers
	}
	serve(cw, req, desc, oreq.Kind, rc)
	return true
}

// servePeer answers manifests and blob HEADs from peers, or with a fast
// 404 so containerd moves on to the next host. Nothing is written before
// the content is verified.
func (r *Registry) servePeer(w http.ResponseWriter, req *http.Request, oreq oci.Request) {
	ctx := req.Context()
	head := req.Method == http.MethodHead
	var (
		desc    ocispec.Descriptor
		content io.ReadSeeker
		err     error
	)
	if oreq.Kind == oci.KindManifest {
		var man fetch.Manifest
		man, err = r.fetcher.Manifest(ctx, oreq)
		desc, content = man.Descriptor, bytes.NewReader(man.Body)
	} else {
		desc, err = r.fetcher.BlobHead(ctx, oreq)
	}
	if err != nil {
		if oreq.Kind == oci.KindManifest && oreq.Registry != "" && r.claims != nil && errors.Is(err, fetch.ErrNoSource) {
			// containerd goes upstream for the image; the nodes that miss
			// it too agree meanwhile which one fetches its blobs.
			r.claims.Begin(oreq.Key(), imageGroup(oreq))
		}
		r.miss(w, oreq, err)
		return
	}
	if refuseRange(w, req, desc.Size) {
		return
	}
	r.hit(w, oreq, nil)
	if head {
		setHeaders(w, desc, oreq.Kind)
		w.Header().Set("Content-Length", strconv.FormatInt(desc.Size, 10))
		w.WriteHeader(http.StatusOK)
		return
	}
	cw := &countingWriter{ResponseWriter: w, counter: r.metrics.ServedBytes.WithLabelValues(metrics.OutcomePeer)}
	serve(cw, req, desc, oreq.Kind, content)
}

// streamPeer answers a blob GET from peers as the bytes arrive. A stream
// that cannot be finished with the right bytes is cut before its end, so
// containerd never commits it; containerd then asks again from where it
// got to, and that Range request, which this agent cannot verify, goes to
// the next host.
func (r *Registry) streamPeer(w http.ResponseWriter, req *http.Request, oreq oci.Request) {
	ctx := req.Context()
	if req.Header.Get("Range") != "" {
		r.log.InfoContext(ctx, "containerd resumes a blob from an offset; sending it to the next host, since a range cannot be verified", "digest", oreq.Digest, "range", req.Header.Get("Range"))
		r.miss(w, oreq, errors.New("a range of a blob this node does not hold cannot be verified"))
		return
	}
	bs, err := r.fetcher.OpenBlob(ctx, oreq)
	size, writing := r.inFlight(oreq.Digest)
	if errors.Is(err, fetch.ErrNoSource) && r.claims != nil {
		if worthAgreeing(size, writing) {
			bs, err = r.agree(ctx, oreq, err)
		} else {
			r.wave(ctx, metrics.WaveSmall)
		}
	}
	// Whether from peers or, after the 404, from upstream, containerd is
	// about to write this blob: peers may stream it from here meanwhile.
	// Only now, with a source, so that two nodes never wait on each other;
	// and only if containerd has opened its ingest (it does before it asks),
	// so a request that is not a pull advertises nothing.
	if r.held != nil && writing {
		r.held.Hold(oreq.Digest.String())
	}
	if err != nil {
		r.miss(w, oreq, err)
		return
	}
	defer bs.Close()
	r.hit(w, oreq, bs.Peers)
	setHeaders(w, bs.Descriptor, oreq.Kind)
	w.Header().Set("Etag", `"`+bs.Descriptor.Digest.String()+`"`)
	w.Header().Set("Content-Length", strconv.FormatInt(bs.Descriptor.Size, 10))
	w.WriteHeader(http.StatusOK)
	cw := &countingWriter{ResponseWriter: w, counter: r.metrics.ServedBytes.WithLabelValues(metrics.OutcomePeer)}
	if _, err := io.Copy(cw, bs); err != nil {
		r.log.WarnContext(ctx, "cutting a blob response that cannot be finished", "digest", oreq.Digest, "peers", bs.Peers, "err", err)
		if a, ok := r.store.(ingestAborter); ok && errors.Is(err, fetch.ErrMismatch) {
			// containerd holds wrong bytes; its retry must not resume them.
			go func() {
				actx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if err := a.AbortIngest(actx, oreq.Digest); err != nil {
					r.log.Warn("dropping containerd's wrong bytes", "digest", oreq.Digest, "err", err)
				}
			}()
		}
		// Aborting closes the connection without the final bytes.
		panic(http.ErrAbortHandler)
	}
}

// agree streams a blob nobody holds from the node that fetches it, if
// other nodes miss it right now too (see agent/claim): the node the
// image's agreement picked, if it fetches this blob, or else the one the
// blob's own agreement picks. It returns err when this node should fetch
// the blob itself.
func (r *Registry) agree(ctx context.Context, oreq oci.Request, err error) (*fetch.BlobStream, error) {
	group := imageGroup(oreq)
	imageFetcher, ok := r.claims.ImageFetcher(ctx, group)
	if ok {
		if bs, ferr := r.follow(ctx, oreq, imageFetcher, fetch.Wait{Blob: imageFollowWait, Image: peerproto.MaxImageWait}); ferr == nil {
			r.wave(ctx, metrics.WaveFollowed)
			return bs, nil
		}
	}
	leader, follow := r.claims.Decide(ctx, oreq.Digest.String(), group)
	if ok && !follow && ctx.Err() == nil {
		// Worth a line: if the image's fetcher does fetch this blob later,
		// the upstream serves it twice.
		r.log.InfoContext(ctx, "fetching a blob upstream that the node fetching its image did not serve", "digest", oreq.Digest, "imageFetcher", imageFetcher.String())
	}
	if follow {
		bs, ferr := r.follow(ctx, oreq, leader, fetch.Wait{Blob: followWait})
		if ferr != nil {
			r.wave(ctx, metrics.WaveFollowFailed)
			return nil, ferr
		}
		r.wave(ctx, metrics.WaveFollowed)
		return bs, nil
	}
	r.wave(ctx, metrics.WaveFetched)
	return nil, err
}

// wave counts what the first wave did with a blob, unless containerd gave
// up on the request meanwhile: then nothing went upstream or was followed.
func (r *Registry) wave(ctx context.Context, outcome string) {
	if ctx.Err() != nil {
		return
	}
	r.metrics.FirstWave.WithLabelValues(outcome).Inc()
}

func (r *Registry) follow(ctx context.Context, oreq oci.Request, leader netip.AddrPort, wait fetch.Wait) (*fetch.BlobStream, error) {
	r.follows.add(oreq.Digest, 1)
	defer r.follows.add(oreq.Digest, -1)
	return r.fetcher.OpenBlobFrom(ctx, oreq, leader, wait)
}

// imageFollowWait is how long the node an image's agreement picked is
// given to start on one of its blobs: its containerd asks for them all at
// once, but at 20 nodes on 2 cores that node's second look and its
// containerd's requests took over a second. A node that does not start
// (its answer is stale: it does not pull that image) costs no more than
// this before the blob's own agreement.
const imageFollowWait = 3 * time.Second

// agreeFrom is the smallest blob the nodes of a burst agree on: a smaller
// one (an image's config, a few KB) goes upstream from each node that
// misses it. The agreement costs a burst one or two settle windows before
// anyone's first byte, while 20 nodes taking 256 KiB each from a 100 MB/s
// upstream cost it 50 ms.
const agreeFrom = 256 << 10

// worthAgreeing: containerd opens its ingest, with the size it expects,
// before it asks; a blob of unknown size is agreed on.
func worthAgreeing(size int64, writing bool) bool {
	return !writing || size >= agreeFrom
}

// inFlight is the size containerd expects of dgst while it writes it, and
// whether it does.
func (r *Registry) inFlight(dgst digest.Digest) (int64, bool) {
	if r.flights == nil {
		return 0, false
	}
	return r.flights.Size(dgst)
}

// serveInFlight serves a peer a blob this node's containerd is still
// writing, as it grows, from the offset a Range header asks for. The bytes
// are what containerd received, not yet verified: the peer verifies them,
// as it does every blob it streams.
func (r *Registry) serveInFlight(w http.ResponseWriter, req *http.Request, oreq oci.Request) bool {
	if r.flights == nil || oreq.Kind != oci.KindBlob {
		return false
	}
	off, ok := peerproto.ParseResumeRange(req.Header.Get("Range"))
	if !ok {
		return false
	}
	start := time.Now()
	wait := headerWait(req, peerproto.WaitHeader, peerproto.MaxWait)
	imageWait := headerWait(req, peerproto.ImageWaitHeader, peerproto.MaxImageWait)
	deadline, longer, poll := start.Add(wait), false, 10*time.Millisecond
	// A node that follows this one may ask before this one decided to fetch.
	for !r.held.Holding(oreq.Digest.String()) && !r.follows.has(oreq.Digest) {
		if time.Now().After(deadline) {
			if longer || imageWait <= wait || !r.pullsForImage(oreq) {
				return false
			}
			// Seconds, for every follower of the image at once: a coarser
			// poll costs the busiest node less.
			longer, poll, deadline = true, 50*time.Millisecond, start.Add(imageWait)
			continue
		}
		select {
		case <-req.Context().Done():
			return false
		case <-time.After(poll):
		}
	}
	g, err := r.flights.Open(req.Context(), oreq.Digest, off, time.Until(deadline))
	if err != nil {
		r.log.Debug("no blob in flight", "digest", oreq.Digest, "err", err)
		return false
	}
	defer g.Close()
	if wait <= 0 && !longer {
		// Only a node that agreed to follow this one waits for its first
		// bytes longer than the stall timeout.
		g.Impatient()
	}
	r.log.Debug("serving a blob in flight", "digest", oreq.Digest, "offset", off, "file", g.Name())
	setHeaders(w, ocispec.Descriptor{Digest: oreq.Digest}, oci.KindBlob)
	w.Header().Set(peerproto.SourceHeader, peerproto.SourceInFlight)
	w.Header().Set("Content-Length", strconv.FormatInt(g.Size()-off, 10))
	if off > 0 {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, g.Size()-1, g.Size()))
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.WriteHeader(http.StatusOK)
	}
	if req.Method == http.MethodHead {
		return true
	}
	cw := &countingWriter{ResponseWriter: w, counter: r.metrics.ServedToPeers}
	if _, err := io.Copy(cw, g); err != nil {
		r.log.Warn("cutting an in-flight blob response", "digest", oreq.Digest, "err", err)
		panic(http.ErrAbortHandler)
	}
	return true
}

// refuseRange answers a Range that selects no byte of size bytes with a
// 416 and reports whether it did. http.ServeContent would answer bytes=-0
// with a 206 of "bytes 10-9/10", and others with no Content-Range.
func refuseRange(w http.ResponseWriter, req *http.Request, size int64) bool {
	err := checkRange(req.Header.Get("Range"), size)
	if err == nil {
		return false
	}
	w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
	writeError(w, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID", err.Error())
	return true
}

// checkRange accepts no Range, or one byte range that selects at least
// one byte of size bytes: "bytes=a-", "bytes=a-b" or "bytes=-n".
func checkRange(h string, size int64) error {
	if h == "" {
		return nil
	}
	spec, ok := strings.CutPrefix(h, "bytes=")
	first, last, dash := strings.Cut(spec, "-")
	if !ok || !dash || strings.Contains(spec, ",") {
		return fmt.Errorf("range %q: want one byte range, bytes=<first>-[<last>] or bytes=-<suffix length>", h)
	}
	if first == "" {
		n, ok := digits(last)
		if !ok || n == 0 || size == 0 {
			return fmt.Errorf("range %q selects none of the %d bytes", h, size)
		}
		return nil
	}
	a, ok := digits(first)
	if !ok {
		return fmt.Errorf("range %q: the first byte is not a number", h)
	}
	if last != "" {
		if b, ok := digits(last); !ok || b < a {
			return fmt.Errorf("range %q: the last byte is not a number at or after the first", h)
		}
	}
	if a >= size {
		return fmt.Errorf("range %q starts past the end of the %d bytes", h, size)
	}
	return nil
}

// digits parses a non-negative decimal number without sign.
func digits(s string) (int64, bool) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// ingestAborter is a store that can drop what containerd has written so
// far of a blob (store.Containerd).
type ingestAborter interface {
	AbortIngest(ctx context.Context, dgst digest.Digest) error
}

func (r *Registry) miss(w http.ResponseWriter, oreq oci.Request, err error) {
	r.metrics.Requests.WithLabelValues(r.metrics.RegistryLabel(oreq.Registry), string(oreq.Kind), metrics.OutcomeMiss).Inc()
	r.log.Debug("mirror miss", "key", oreq.Key(), "err", err)
	notFound(w, oreq)
}

func (r *Registry) hit(w http.ResponseWriter, oreq oci.Request, peers []netip.AddrPort) {
	r.metrics.Requests.WithLabelValues(r.metrics.RegistryLabel(oreq.Registry), string(oreq.Kind), metrics.OutcomePeer).Inc()
	r.metrics.LastSuccess.Set(float64(time.Now().Unix()))
	w.Header().Set(peerproto.SourceHeader, peerproto.PeerSource(peers))
}

// maxRangeHeader bounds the Range header: containerd and peers send one
// range, "bytes=<offset>-", far shorter.
const maxRangeHeader = 64

// serve writes content with its headers; http.ServeContent answers HEAD and
// single Range requests, and sends files with sendfile.
func serve(w http.ResponseWriter, req *http.Request, desc ocispec.Descriptor, kind oci.Kind, content io.ReadSeeker) {
	if refuseRange(w, req, desc.Size) {
		return
	}
	setHeaders(w, desc, kind)
	w.Header().Set("Etag", `"`+desc.Digest.String()+`"`)
	http.ServeContent(w, req, "", time.Time{}, content)
}

func setHeaders(w http.ResponseWriter, desc ocispec.Descriptor, kind oci.Kind) {
	mt := desc.MediaType
	if mt == "" || kind == oci.KindBlob {
		mt = "application/octet-stream"
	}
	w.Header().Set("Content-Type", mt)
	w.Header().Set("Docker-Content-Digest", desc.Digest.String())
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
}

func notFoundCode(oreq oci.Request) string {
	if oreq.Kind == oci.KindManifest {
		return "MANIFEST_UNKNOWN"
	}
	return "BLOB_UNKNOWN"
}

func notFound(w http.ResponseWriter, oreq oci.Request) {
	code := notFoundCode(oreq)
	ref := oreq.Tag
	if oreq.Digest != "" {
		ref = oreq.Digest.String()
	}
	writeError(w, http.StatusNotFound, code, oreq.Repository+":"+ref+" is on no node of this cluster")
}

// writeParseError answers a request that did not parse with the
// distribution error code for what was wrong.
func writeParseError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, oci.ErrDigestInvalid):
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", err.Error())
	case errors.Is(err, oci.ErrNameInvalid):
		writeError(w, http.StatusBadRequest, "NAME_INVALID", err.Error())
	case errors.Is(err, oci.ErrTagInvalid):
		// Malformed, so it names no manifest anywhere.
		writeError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", err.Error())
	default:
		writeError(w, http.StatusNotFound, "UNSUPPORTED", err.Error()+"; this read-only mirror serves GET and HEAD of /v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest> and /v2/<name>/tags/list")
	}
}

// writeError writes an OCI distribution error body.
func writeError(w http.ResponseWriter, status int, code, message string) {
	type ociError struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(struct {
		Errors []ociError `json:"errors"`
	}{[]ociError{{Code: code, Message: message}}})
}

// countingWriter counts body bytes as they go, so served-bytes metrics move
// during a long transfer, and keeps io.ReaderFrom so files still go out
// with sendfile underneath.
type countingWriter struct {
	http.ResponseWriter
	counter interface{ Add(float64) }
}

// countChunk is how often a transfer's bytes are added to the counter.
const countChunk = 8 << 20

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.add(int64(n))
	return n, err
}

func (c *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	// http.ServeContent hands over an *io.LimitedReader around the file;
	// re-slicing it keeps one LimitedReader over the file, which sendfile
	// accepts, while the counter moves every chunk.
	remain := int64(-1)
	if lr, ok := r.(*io.LimitedReader); ok {
		r, remain = lr.R, lr.N
	}
	var total int64
	for remain != 0 {
		chunk := int64(countChunk)
		if remain > 0 && remain < chunk {
			chunk = remain
		}
		n, err := io.Copy(c.ResponseWriter, &io.LimitedReader{R: r, N: chunk})
		total += n
		c.add(n)
		if remain > 0 {
			remain -= n
		}
		if err != nil {
			return total, err
		}
		if n < chunk {
			break
		}
	}
	return total, nil
}

func (c *countingWriter) add(n int64) {
	c.counter.Add(float64(n))
}
