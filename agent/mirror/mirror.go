// Package mirror fetches content this node lacks from the peers that
// advertise it, and never hands on bytes it has not verified: containerd
// fails a whole pull on a corrupt 200, but falls back to upstream at once on
// a 404, so every failure here must happen before the first byte is sent.
package mirror

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// PeerHeader marks a request from another agent. A peer answers such a
// request from its own store only and never forwards it, so a lookup can
// never loop between agents.
const PeerHeader = "X-Fleetmirror-Peer"

// ErrNoSource means no peer could serve the content; the registry answers
// 404 and containerd goes to the next host.
var ErrNoSource = errors.New("no peer could serve it")

// maxManifestSize bounds what is read from a peer into memory; registries
// refuse manifests over 4 MiB as well.
const maxManifestSize = 4 << 20

// Mirror finds and fetches content from peers.
type Mirror struct {
	router         routing.Router
	client         *http.Client
	resolveTimeout time.Duration
	peers          int
	stallTimeout   time.Duration
	spoolDir       string
	metrics        *metrics.Metrics
	log            *slog.Logger
	hints          *hints
}

// Option configures a Mirror.
type Option func(*Mirror)

// WithResolveTimeout bounds how long finding a (further) peer may take.
func WithResolveTimeout(d time.Duration) Option { return func(m *Mirror) { m.resolveTimeout = d } }

// WithPeers sets how many peers are tried before giving up.
func WithPeers(n int) Option { return func(m *Mirror) { m.peers = n } }

// WithStallTimeout sets how long a peer may send nothing before it is
// abandoned for the next one.
func WithStallTimeout(d time.Duration) Option { return func(m *Mirror) { m.stallTimeout = d } }

// WithSpoolDir sets where blobs from peers are held while they are verified.
func WithSpoolDir(dir string) Option { return func(m *Mirror) { m.spoolDir = dir } }

// WithMetrics records fetches in m.
func WithMetrics(mt *metrics.Metrics) Option { return func(m *Mirror) { m.metrics = mt } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(m *Mirror) { m.log = l } }

// WithHTTPClient replaces the client used to reach peers.
func WithHTTPClient(c *http.Client) Option { return func(m *Mirror) { m.client = c } }

// New returns a Mirror that finds peers through router.
func New(router routing.Router, opts ...Option) (*Mirror, error) {
	if router == nil {
		return nil, errors.New("mirror: a router is required")
	}
	m := &Mirror{
		router:         router,
		resolveTimeout: 20 * time.Millisecond,
		peers:          3,
		stallTimeout:   5 * time.Second,
		spoolDir:       os.TempDir(),
		log:            slog.Default(),
		hints:          newHints(),
		client: &http.Client{Transport: &http.Transport{
			// Peers are on the node network: a peer that cannot be reached
			// quickly is treated as gone rather than waited for.
			DialContext:           (&netDialer).DialContext,
			MaxIdleConnsPerHost:   8,
			IdleConnTimeout:       90 * time.Second,
			ResponseHeaderTimeout: 5 * time.Second,
			DisableCompression:    true,
		}},
	}
	for _, o := range opts {
		o(m)
	}
	if m.resolveTimeout <= 0 {
		return nil, fmt.Errorf("mirror: resolve timeout must be positive, got %s", m.resolveTimeout)
	}
	if m.peers < 1 {
		return nil, fmt.Errorf("mirror: peers to try must be at least 1, got %d", m.peers)
	}
	return m, nil
}

// peerSource yields peers holding a key: each wait for the next one is
// bounded by the resolve timeout, so a miss costs one timeout.
type peerSource struct {
	ch      <-chan netip.AddrPort // nil once closed
	timeout time.Duration
	cancel  context.CancelFunc
	tried   int
	max     int
	hint    netip.AddrPort // see hints; zero once tried
	hinted  netip.AddrPort // the hint once it was given out
}

// lookup finds peers for key; d, when set, is the digest the key names,
// whose hinted peer is tried when the lookup gives none in time.
func (m *Mirror) lookup(ctx context.Context, key string, d digest.Digest) (*peerSource, error) {
	lctx, cancel := context.WithCancel(ctx)
	ch, err := m.router.Lookup(lctx, key, m.peers)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("looking up %s: %w", key, err)
	}
	src := &peerSource{ch: ch, timeout: m.resolveTimeout, cancel: cancel, max: m.peers}
	src.hint, _ = m.hints.peer(d)
	return src, nil
}

// next returns the next peer to try: one the lookup found within the
// resolve timeout, else the hint, each peer once.
func (s *peerSource) next(ctx context.Context) (netip.AddrPort, bool) {
	for s.tried < s.max {
		if s.ch == nil {
			break
		}
		t := time.NewTimer(s.timeout)
		select {
		case p, ok := <-s.ch:
			t.Stop()
			if !ok {
				s.ch = nil
				continue
			}
			if p == s.hinted {
				continue
			}
			if p == s.hint {
				s.hint = netip.AddrPort{}
			}
			s.tried++
			return p, true
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return netip.AddrPort{}, false
		}
		break
	}
	if s.tried < s.max && s.hint.IsValid() {
		s.hinted, s.hint = s.hint, netip.AddrPort{}
		s.tried++
		return s.hinted, true
	}
	return netip.AddrPort{}, false
}

func (s *peerSource) close() { s.cancel() }

// firstPeer waits for the first peer and records how long the lookup took.
func (m *Mirror) firstPeer(ctx context.Context, src *peerSource, kind oci.Kind) (netip.AddrPort, bool) {
	start := time.Now()
	p, ok := src.next(ctx)
	if m.metrics != nil {
		m.metrics.ResolveDuration.WithLabelValues(string(kind)).Observe(time.Since(start).Seconds())
	}
	return p, ok
}

// Manifest is a manifest fetched from a peer and checked against its digest.
type Manifest struct {
	Descriptor ocispec.Descriptor
	// Body is nil for HEAD requests.
	Body []byte
}

// Manifest fetches a manifest by tag or digest. With head set only the
// descriptor is fetched; containerd then asks for the body by digest,
// which is verified.
func (m *Mirror) Manifest(ctx context.Context, req oci.Request, head bool) (Manifest, error) {
	key := req.Key()
	if key == "" {
		return Manifest{}, fmt.Errorf("%w: a tag without the ns parameter names no registry", ErrNoSource)
	}
	src, err := m.lookup(ctx, key, req.Digest)
	if err != nil {
		return Manifest{}, err
	}
	defer src.close()
	p, ok := m.firstPeer(ctx, src, req.Kind)
	for ; ok; p, ok = src.next(ctx) {
		man, err := m.manifestFrom(ctx, p, req, head)
		if err == nil {
			if man.Body != nil {
				m.hints.learn(p, man.Body)
			}
			return man, nil
		}
		m.log.WarnContext(ctx, "peer failed to serve manifest", "peer", p.String(), "key", key, "err", err)
	}
	return Manifest{}, fmt.Errorf("manifest %s: %w", key, ErrNoSource)
}

func (m *Mirror) manifestFrom(ctx context.Context, p netip.AddrPort, req oci.Request, head bool) (Manifest, error) {
	method := http.MethodGet
	if head {
		method = http.MethodHead
	}
	ref := req.Tag
	if req.Digest != "" {
		ref = req.Digest.String()
	}
	resp, err := m.do(ctx, method, p, req, "manifests", ref, "")
	if err != nil {
		return Manifest{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		m.fail("status")
		return Manifest{}, fmt.Errorf("status %s", resp.Status)
	}
	desc, err := descriptorOf(resp, req.Digest)
	if err != nil {
		m.fail("digest")
		return Manifest{}, err
	}
	if head {
		return Manifest{Descriptor: desc}, nil
	}
	if desc.Size > maxManifestSize {
		m.fail("status")
		return Manifest{}, fmt.Errorf("manifest of %d bytes is over the %d byte limit", desc.Size, maxManifestSize)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	m.fetched(int64(len(body)))
	if err != nil {
		m.fail("short")
		return Manifest{}, fmt.Errorf("reading manifest: %w", err)
	}
	if int64(len(body)) != desc.Size || digest.FromBytes(body) != desc.Digest {
		m.fail("digest")
		return Manifest{}, fmt.Errorf("manifest body does not match digest %s", desc.Digest)
	}
	return Manifest{Descriptor: desc, Body: body}, nil
}

// descriptorOf reads what a peer claims about content and checks it
// against the digest asked for, when one was.
func descriptorOf(resp *http.Response, want digest.Digest) (ocispec.Descriptor, error) {
	d, err := oci.ParseDigest(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("peer sent no usable Docker-Content-Digest: %w", err)
	}
	if want != "" && d != want {
		return ocispec.Descriptor{}, fmt.Errorf("peer answered %s for %s", d, want)
	}
	if resp.ContentLength < 0 {
		return ocispec.Descriptor{}, errors.New("peer sent no Content-Length")
	}
	return ocispec.Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: resp.ContentLength}, nil
}

// BlobHead asks peers for a blob's size.
func (m *Mirror) BlobHead(ctx context.Context, req oci.Request) (ocispec.Descriptor, error) {
	src, err := m.lookup(ctx, req.Key(), req.Digest)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer src.close()
	p, ok := m.firstPeer(ctx, src, req.Kind)
	for ; ok; p, ok = src.next(ctx) {
		resp, err := m.do(ctx, http.MethodHead, p, req, "blobs", req.Digest.String(), "")
		if err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			m.fail("status")
			continue
		}
		desc, err := descriptorOf(resp, req.Digest)
		if err == nil {
			return desc, nil
		}
		m.fail("digest")
	}
	return ocispec.Descriptor{}, fmt.Errorf("blob %s: %w", req.Digest, ErrNoSource)
}

// Blob is a blob fetched from peers into an unlinked spool file and
// verified against its digest; nothing of it remains once closed.
type Blob struct {
	*os.File
	Descriptor ocispec.Descriptor
	// Peers that contributed bytes, for logs and the debug page.
	Peers []netip.AddrPort
}

// Blob fetches a whole blob from peers. A peer that breaks off is resumed
// from the next one with a Range request; a blob that fails verification
// is fetched again from peers that did not serve it.
func (m *Mirror) Blob(ctx context.Context, req oci.Request) (*Blob, error) {
	src, err := m.lookup(ctx, req.Key(), req.Digest)
	if err != nil {
		return nil, err
	}
	defer src.close()
	p, ok := m.firstPeer(ctx, src, req.Kind)
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", req.Digest, ErrNoSource)
	}
	f, err := m.spool()
	if err != nil {
		return nil, err
	}
	sp := &spool{file: f, hash: sha256.New(), size: -1}
	for ; ok; p, ok = src.next(ctx) {
		err := m.blobFrom(ctx, p, req, sp)
		if err != nil {
			m.log.WarnContext(ctx, "peer failed to serve blob", "peer", p.String(), "digest", req.Digest, "offset", sp.off, "err", err)
			continue
		}
		if sp.off < sp.size {
			continue
		}
		if got := digest.NewDigest(digest.SHA256, sp.hash); got != req.Digest {
			m.fail("digest")
			m.log.WarnContext(ctx, "blob from peers failed verification", "peers", sp.peers, "digest", req.Digest, "got", got)
			if err := sp.reset(); err != nil {
				break
			}
			continue
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			break
		}
		return &Blob{File: f, Peers: sp.peers,
			Descriptor: ocispec.Descriptor{MediaType: sp.mediaType, Digest: req.Digest, Size: sp.size}}, nil
	}
	f.Close()
	return nil, fmt.Errorf("blob %s: %w", req.Digest, ErrNoSource)
}

func (m *Mirror) spool() (*os.File, error) {
	f, err := os.CreateTemp(m.spoolDir, "fleetmirror-blob-*")
	if err != nil {
		return nil, fmt.Errorf("creating spool file in %s (set --spool-dir to a writable folder): %w", m.spoolDir, err)
	}
	// Unlinked at once: the agent keeps no state, even across a crash.
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("unlinking spool file: %w", err)
	}
	return f, nil
}

// spool is a blob being assembled, possibly from several peers.
type spool struct {
	file      *os.File
	hash      hash.Hash
	off, size int64
	mediaType string
	peers     []netip.AddrPort
}

func (s *spool) reset() error {
	s.off = 0
	s.hash.Reset()
	if err := s.file.Truncate(0); err != nil {
		return err
	}
	_, err := s.file.Seek(0, io.SeekStart)
	return err
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// blobFrom appends to sp what peer p serves from sp's offset on.
func (m *Mirror) blobFrom(ctx context.Context, p netip.AddrPort, req oci.Request, sp *spool) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	rng := ""
	if sp.off > 0 {
		rng = fmt.Sprintf("bytes=%d-", sp.off)
	}
	resp, err := m.do(ctx, http.MethodGet, p, req, "blobs", req.Digest.String(), rng)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	size, err := contentSize(resp, sp.off)
	if err != nil {
		m.fail("status")
		return err
	}
	if sp.size >= 0 && size != sp.size {
		m.fail("status")
		return fmt.Errorf("peer says the blob has %d bytes, another said %d", size, sp.size)
	}
	sp.size = size
	if sp.mediaType == "" {
		sp.mediaType = resp.Header.Get("Content-Type")
	}
	sp.peers = append(sp.peers, p)

	// A peer that stops sending is abandoned after the stall timeout so the
	// next one can resume; a pull never hangs on one peer.
	watchdog := time.AfterFunc(m.stallTimeout, func() { cancel(errors.New("peer stalled")) })
	defer watchdog.Stop()

	// Reading the socket and writing+hashing run side by side: containerd
	// waits for the verified blob, so both cores can work on it.
	type chunk struct {
		buf *[]byte
		n   int
	}
	const depth = 4
	full := make(chan chunk, depth)
	free := make(chan *[]byte, depth)
	for range depth {
		free <- bufPool.Get().(*[]byte)
	}
	defer func() {
		for range depth {
			bufPool.Put(<-free)
		}
	}()
	readErr := make(chan error, 1)
	go func() {
		defer close(full)
		remaining := sp.size - sp.off
		for remaining > 0 {
			var b *[]byte
			select {
			case b = <-free:
			case <-ctx.Done():
				readErr <- context.Cause(ctx)
				return
			}
			n, err := resp.Body.Read((*b)[:min(int64(len(*b)), remaining)])
			if n > 0 {
				watchdog.Reset(m.stallTimeout)
				remaining -= int64(n)
				full <- chunk{b, n}
			} else {
				free <- b
			}
			if err != nil && remaining > 0 {
				if c := context.Cause(ctx); c != nil {
					err = c
				}
				readErr <- err
				return
			}
		}
	}()
	var werr error
	for c := range full {
		if werr == nil {
			data := (*c.buf)[:c.n]
			if _, err := sp.file.Write(data); err != nil {
				werr = fmt.Errorf("writing spool file: %w", err)
				cancel(werr)
			} else {
				sp.hash.Write(data)
				sp.off += int64(c.n)
				m.fetched(int64(c.n))
			}
		}
		free <- c.buf
	}
	if werr != nil {
		return werr
	}
	select {
	case err := <-readErr:
		m.fail("short")
		return fmt.Errorf("after %d of %d bytes: %w", sp.off, sp.size, err)
	default:
	}
	return nil
}

// contentSize checks a blob response starts where asked and returns the
// blob's full size.
func contentSize(resp *http.Response, off int64) (int64, error) {
	if off == 0 {
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("status %s", resp.Status)
		}
		if resp.ContentLength < 0 {
			return 0, errors.New("peer sent no Content-Length")
		}
		return resp.ContentLength, nil
	}
	if resp.StatusCode != http.StatusPartialContent {
		return 0, fmt.Errorf("status %s to a Range request", resp.Status)
	}
	var start, end, size int64
	if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &size); err != nil {
		return 0, fmt.Errorf("bad Content-Range %q", resp.Header.Get("Content-Range"))
	}
	if start != off || end != size-1 {
		return 0, fmt.Errorf("Content-Range %q does not resume at %d", resp.Header.Get("Content-Range"), off)
	}
	return size, nil
}

func (m *Mirror) do(ctx context.Context, method string, p netip.AddrPort, req oci.Request, kind, ref, rng string) (*http.Response, error) {
	u := "http://" + p.String() + "/v2/" + req.Repository + "/" + kind + "/" + ref
	if req.Registry != "" {
		u += "?ns=" + req.Registry
	}
	hr, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, err
	}
	hr.Header.Set(PeerHeader, "1")
	if rng != "" {
		hr.Header.Set("Range", rng)
	}
	resp, err := m.client.Do(hr)
	if err != nil {
		m.fail("connect")
		return nil, err
	}
	return resp, nil
}

func (m *Mirror) fail(reason string) {
	if m.metrics != nil {
		m.metrics.PeerFailures.WithLabelValues(reason).Inc()
	}
}

func (m *Mirror) fetched(n int64) {
	if m.metrics != nil {
		m.metrics.FetchedBytes.Add(float64(n))
	}
}

// netDialer gives up on a peer that does not accept within a second: peers
// are on the node network, and the next peer or upstream is better than waiting.
var netDialer = net.Dialer{Timeout: time.Second, KeepAlive: 30 * time.Second}
