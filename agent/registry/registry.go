// Package registry is the agent's read-only OCI distribution endpoint: it
// serves what the node's containerd holds, and for the node's own
// containerd, what peers hold.
package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/mirror"
	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/store"
)

// SourceHeader tells a client of this node where a response's content came
// from: "local", or "peer" followed by the peers' registry addresses when
// known ("peer 10.0.0.12:30020"). The debug page's Measure Image Pull reads
// it; containerd ignores it.
const SourceHeader = "X-Fleetmirror-Source"

// Registry serves the distribution API.
type Registry struct {
	store   store.Store
	mirror  *mirror.Mirror
	metrics *metrics.Metrics
	log     *slog.Logger
	ready   func(context.Context) error
}

// Option configures a Registry.
type Option func(*Registry)

// WithMirror fetches what the node lacks from peers; without it the
// registry serves only local content.
func WithMirror(m *mirror.Mirror) Option { return func(r *Registry) { r.mirror = m } }

// WithMetrics records requests in m.
func WithMetrics(m *metrics.Metrics) Option { return func(r *Registry) { r.metrics = m } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(r *Registry) { r.log = l } }

// WithReadiness sets the check behind /readyz.
func WithReadiness(f func(context.Context) error) Option { return func(r *Registry) { r.ready = f } }

// New returns a registry serving from st.
func New(st store.Store, opts ...Option) (*Registry, error) {
	if st == nil {
		return nil, errors.New("registry: a store is required")
	}
	r := &Registry{store: st, log: slog.Default(), ready: func(context.Context) error { return nil }}
	for _, o := range opts {
		o(r)
	}
	if r.metrics == nil {
		r.metrics = metrics.New(func() int { return 0 })
	}
	return r, nil
}

func (r *Registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	switch req.URL.Path {
	case "/livez":
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "ok\n")
		return
	case "/readyz":
		if err := r.ready(req.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
		return
	case "/v2", "/v2/":
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		if !readOnly(w, req) {
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, "{}")
		return
	}
	if !readOnly(w, req) {
		return
	}
	if !strings.HasPrefix(req.URL.Path, "/v2/") {
		writeError(w, http.StatusNotFound, "NOT_FOUND", "not a distribution API path: "+req.URL.Path)
		return
	}
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
	if oreq.Tag != "" && oreq.Registry == "" {
		// Without ns a tag names no registry: only this node's store can
		// say which image it means, and peers are never asked.
		r.serveUnqualifiedTag(w, req, oreq)
		return
	}
	if r.serveLocal(w, req, oreq) {
		return
	}
	if req.Header.Get(mirror.PeerHeader) != "" || r.mirror == nil {
		// Never forward a peer's request: it would bounce between agents.
		notFound(w, oreq)
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
	fromPeer := req.Header.Get(mirror.PeerHeader) != ""
	if !fromPeer {
		r.metrics.Requests.WithLabelValues(registryLabel(oreq), string(oreq.Kind), metrics.OutcomeLocal).Inc()
	}
	w.Header().Set(SourceHeader, metrics.OutcomeLocal)
	cw := &countingWriter{ResponseWriter: w, counter: r.metrics.ServedBytes.WithLabelValues(metrics.OutcomeLocal)}
	if fromPeer {
		cw.counter = r.metrics.ServedToPeers
	}
	serve(cw, req, desc, oreq.Kind, rc)
	return true
}

// servePeer answers from peers, or with a fast 404 so containerd moves on
// to the next host. Nothing is written before the content is verified.
func (r *Registry) servePeer(w http.ResponseWriter, req *http.Request, oreq oci.Request) {
	ctx := req.Context()
	head := req.Method == http.MethodHead
	label := registryLabel(oreq)
	var (
		desc    ocispec.Descriptor
		content io.ReadSeeker
		peers   []netip.AddrPort
		err     error
	)
	switch {
	case oreq.Kind == oci.KindManifest:
		var man mirror.Manifest
		man, err = r.mirror.Manifest(ctx, oreq, head)
		desc = man.Descriptor
		if err == nil && !head {
			content = bytes.NewReader(man.Body)
		}
	case head:
		desc, err = r.mirror.BlobHead(ctx, oreq)
	default:
		var b *mirror.Blob
		b, err = r.mirror.Blob(ctx, oreq)
		if err == nil {
			defer b.Close()
			desc, content, peers = b.Descriptor, b.File, b.Peers
		}
	}
	if err != nil {
		r.metrics.Requests.WithLabelValues(label, string(oreq.Kind), metrics.OutcomeMiss).Inc()
		r.log.DebugContext(ctx, "mirror miss", "key", oreq.Key(), "err", err)
		notFound(w, oreq)
		return
	}
	r.metrics.Requests.WithLabelValues(label, string(oreq.Kind), metrics.OutcomePeer).Inc()
	r.metrics.LastSuccess.Set(float64(time.Now().Unix()))
	w.Header().Set(SourceHeader, peerSource(peers))
	if head {
		setHeaders(w, desc, oreq.Kind)
		w.Header().Set("Content-Length", strconv.FormatInt(desc.Size, 10))
		w.WriteHeader(http.StatusOK)
		return
	}
	cw := &countingWriter{ResponseWriter: w, counter: r.metrics.ServedBytes.WithLabelValues(metrics.OutcomePeer)}
	serve(cw, req, desc, oreq.Kind, content)
}

// serve writes content with its headers; http.ServeContent answers HEAD and
// single Range requests, and sends files with sendfile.
func serve(w http.ResponseWriter, req *http.Request, desc ocispec.Descriptor, kind oci.Kind, content io.ReadSeeker) {
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

// peerSource is the SourceHeader value for content from peers.
func peerSource(peers []netip.AddrPort) string {
	s := metrics.OutcomePeer
	for i, p := range peers {
		if i == 0 {
			s += " "
		} else {
			s += ","
		}
		s += p.String()
	}
	return s
}

func registryLabel(oreq oci.Request) string {
	if oreq.Registry == "" {
		return "unknown"
	}
	return oreq.Registry
}

func notFound(w http.ResponseWriter, oreq oci.Request) {
	code := "BLOB_UNKNOWN"
	if oreq.Kind == oci.KindManifest {
		code = "MANIFEST_UNKNOWN"
	}
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
