// Package fetch fetches content this node lacks from the peers that
// advertise it. containerd falls back to upstream at once on a 404 but
// fails a pull on a corrupt 200, so manifests and small blobs are verified
// before their first byte, and large blobs are streamed with their last
// bytes held back until the digest verifies (see BlobStream).
package fetch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerauth"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// ErrNoSource means no peer could serve the content; the registry answers
// 404 and containerd goes to the next host.
var ErrNoSource = errors.New("no peer could serve it")

// Fetcher finds and fetches content from peers.
type Fetcher struct {
	router         Router
	client         *http.Client
	followClient   *http.Client // client with the header timeout at followWait
	followWait     time.Duration
	resolveTimeout time.Duration
	peers          int
	stallTimeout   time.Duration
	metrics        *metrics.Metrics
	log            *slog.Logger
	key            *peerauth.Key
	hints          *hints
	bad            *badPeers
	manifests      *recentManifests
}

// Router is what the mirror needs of the node's router.
type Router interface {
	// Lookup streams the registry addresses of up to count peers holding key.
	Lookup(ctx context.Context, key string, count int) (<-chan netip.AddrPort, error)
}

// Option configures a Fetcher.
type Option func(*Fetcher)

// WithResolveTimeout bounds how long finding a (further) peer may take.
func WithResolveTimeout(d time.Duration) Option { return func(m *Fetcher) { m.resolveTimeout = d } }

// WithPeers sets how many peers are tried before giving up.
func WithPeers(n int) Option { return func(m *Fetcher) { m.peers = n } }

// StallTimeout is how long a peer may send (next to) nothing by default.
const StallTimeout = 5 * time.Second

// WithStallTimeout sets how long a peer may send (next to) nothing before
// it is abandoned for the next one.
func WithStallTimeout(d time.Duration) Option { return func(m *Fetcher) { m.stallTimeout = d } }

// WithFollowWait sets how long a node waits for the first bytes of the
// node it agreed to follow (peerproto.FollowWait by default).
func WithFollowWait(d time.Duration) Option { return func(m *Fetcher) { m.followWait = d } }

// WithMetrics records fetches in m.
func WithMetrics(mt *metrics.Metrics) Option { return func(m *Fetcher) { m.metrics = mt } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(m *Fetcher) { m.log = l } }

// WithPeerKey signs requests to peers with the cluster's key and believes
// only answers that prove they come from a member. Without it requests
// are marked as a peer's but unsigned, as agents before membership sent.
func WithPeerKey(k *peerauth.Key) Option { return func(m *Fetcher) { m.key = k } }

// WithHTTPClient replaces the client used to reach peers.
func WithHTTPClient(c *http.Client) Option { return func(m *Fetcher) { m.client = c } }

// New returns a Fetcher that finds peers through router.
func New(router Router, opts ...Option) (*Fetcher, error) {
	if router == nil {
		return nil, errors.New("fetch: a router is required")
	}
	m := &Fetcher{
		router:         router,
		resolveTimeout: 20 * time.Millisecond,
		peers:          3,
		stallTimeout:   StallTimeout,
		followWait:     peerproto.FollowWait,
		log:            slog.Default(),
		hints:          newHints(),
		bad:            newBadPeers(),
		manifests:      newRecentManifests(),
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
		return nil, fmt.Errorf("fetch: resolve timeout must be positive, got %s", m.resolveTimeout)
	}
	if m.peers < 1 {
		return nil, fmt.Errorf("fetch: peers to try must be at least 1, got %d", m.peers)
	}
	if m.followWait <= 0 {
		return nil, fmt.Errorf("fetch: follow wait must be positive, got %s", m.followWait)
	}
	// The node followed answers its headers with its first bytes; only
	// that request waits longer for them, every other keeps the short
	// header timeout, so that a peer that hangs costs no more than before.
	m.followClient = m.client
	if t, ok := m.client.Transport.(*http.Transport); ok {
		ft := t.Clone()
		ft.ResponseHeaderTimeout = m.followWait
		m.followClient = &http.Client{Transport: ft, CheckRedirect: m.client.CheckRedirect, Jar: m.client.Jar, Timeout: m.client.Timeout}
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
	skip    []netip.AddrPort
}

// lookup finds peers for key; d, when set, is the digest the key names,
// whose hinted peer is tried when the lookup gives none in time.
func (m *Fetcher) lookup(ctx context.Context, key string, d digest.Digest) (*peerSource, error) {
	lctx, cancel := context.WithCancel(ctx)
	bad := m.bad.peers(d)
	// Peers that sent this digest wrong are skipped without using up a try.
	ch, err := m.router.Lookup(lctx, key, m.peers+len(bad))
	if err != nil {
		cancel()
		return nil, fmt.Errorf("looking up %s: %w", key, err)
	}
	src := &peerSource{ch: ch, timeout: m.resolveTimeout, cancel: cancel, max: m.peers, skip: bad}
	if h, ok := m.hints.peer(d); ok && !slices.Contains(bad, h) {
		src.hint = h
	}
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
			if p == s.hinted || slices.Contains(s.skip, p) {
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
func (m *Fetcher) firstPeer(ctx context.Context, src *peerSource, kind oci.Kind) (netip.AddrPort, bool) {
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
	Body       []byte
}

// Manifest fetches a manifest by tag or digest and checks it against its
// digest, for HEAD requests too: the size and digest a HEAD answers are
// then ones this agent verified, so a peer lying about them cannot make
// containerd fail a pull. A manifest verified lately is answered from
// memory (containerd's HEAD by tag is followed by a GET by digest).
func (m *Fetcher) Manifest(ctx context.Context, req oci.Request) (Manifest, error) {
	key := req.Key()
	if key == "" {
		return Manifest{}, fmt.Errorf("%w: a tag without the ns parameter names no registry", ErrNoSource)
	}
	if man, ok := m.manifests.get(req.Digest); ok {
		return man, nil
	}
	src, err := m.lookup(ctx, key, req.Digest)
	if err != nil {
		return Manifest{}, err
	}
	defer src.close()
	p, ok := m.firstPeer(ctx, src, req.Kind)
	for ; ok; p, ok = src.next(ctx) {
		man, err := m.manifestFrom(ctx, p, req)
		if err == nil {
			m.hints.learn(p, man.Body)
			m.manifests.add(man)
			return man, nil
		}
		m.log.WarnContext(ctx, "peer failed to serve manifest", "peer", p.String(), "key", key, "err", err)
	}
	return Manifest{}, fmt.Errorf("manifest %s: %w", key, ErrNoSource)
}

// manifestFrom fetches a manifest from p, within the stall timeout: it is
// small, and a peer that drips it is as good as gone.
func (m *Fetcher) manifestFrom(ctx context.Context, p netip.AddrPort, req oci.Request) (Manifest, error) {
	ctx, cancel := context.WithTimeout(ctx, m.stallTimeout)
	defer cancel()
	ref := req.Tag
	if req.Digest != "" {
		ref = req.Digest.String()
	}
	resp, err := m.do(ctx, http.MethodGet, p, req, peerproto.Manifests, ref, "", Wait{})
	if err != nil {
		return Manifest{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		m.fail("status")
		return Manifest{}, fmt.Errorf("status %s", resp.Status)
	}
	desc, err := peerproto.DescriptorOf(resp, req.Digest)
	if err != nil {
		m.fail("digest")
		return Manifest{}, err
	}
	if desc.Size > peerproto.MaxManifestSize {
		m.fail("status")
		return Manifest{}, fmt.Errorf("manifest of %d bytes is over the %d byte limit", desc.Size, peerproto.MaxManifestSize)
	}
	body, err := peerproto.ReadManifest(resp.Body)
	m.fetched(int64(len(body)))
	if err != nil {
		m.fail("short")
		return Manifest{}, fmt.Errorf("reading manifest: %w", err)
	}
	if err := peerproto.VerifyManifest(body, desc.Digest, desc.Size); err != nil {
		m.fail("digest")
		return Manifest{}, err
	}
	return Manifest{Descriptor: desc, Body: body}, nil
}

// BlobHead asks peers for a blob's size.
func (m *Fetcher) BlobHead(ctx context.Context, req oci.Request) (ocispec.Descriptor, error) {
	src, err := m.lookup(ctx, req.Key(), req.Digest)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer src.close()
	p, ok := m.firstPeer(ctx, src, req.Kind)
	for ; ok; p, ok = src.next(ctx) {
		resp, err := m.do(ctx, http.MethodHead, p, req, peerproto.Blobs, req.Digest.String(), "", Wait{})
		if err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			m.fail("status")
			continue
		}
		desc, err := peerproto.DescriptorOf(resp, req.Digest)
		if err == nil {
			return desc, nil
		}
		m.fail("digest")
	}
	return ocispec.Descriptor{}, fmt.Errorf("blob %s: %w", req.Digest, ErrNoSource)
}

// Wait is what a follower asks the node it follows to wait for before it
// answers: Blob for the blob to appear in flight (peerproto.WaitHeader),
// Image for one that a manifest that node's containerd pulls names
// (peerproto.ImageWaitHeader).
type Wait struct{ Blob, Image time.Duration }

func (m *Fetcher) do(ctx context.Context, method string, p netip.AddrPort, req oci.Request, segment, ref, rng string, wait Wait) (*http.Response, error) {
	hr, err := http.NewRequestWithContext(ctx, method, peerproto.PeerURL(p, req, segment, ref), nil)
	if err != nil {
		return nil, err
	}
	if rng != "" {
		hr.Header.Set("Range", rng)
	}
	client := m.client
	if wait.Blob > 0 {
		hr.Header.Set(peerproto.WaitHeader, wait.Blob.String())
		client = m.followClient
	}
	if wait.Image > 0 {
		hr.Header.Set(peerproto.ImageWaitHeader, wait.Image.String())
		client = m.followClient
	}
	proof := "1"
	if m.key != nil {
		proof = m.key.Sign(hr)
	} else {
		hr.Header.Set(peerproto.PeerHeader, proof)
	}
	resp, err := client.Do(hr)
	if err != nil {
		m.fail("connect")
		return nil, err
	}
	// A miss needs no proof: it only sends containerd on. Content does,
	// so that an address a record named cannot answer for a member.
	if m.key != nil && resp.StatusCode < 300 {
		if err := m.key.Check(resp, proof); err != nil {
			resp.Body.Close()
			m.fail("auth")
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	return resp, nil
}

func (m *Fetcher) fail(reason string) {
	if m.metrics != nil {
		m.metrics.PeerFailures.WithLabelValues(reason).Inc()
	}
}

func (m *Fetcher) fetched(n int64) {
	if m.metrics != nil {
		m.metrics.FetchedBytes.Add(float64(n))
	}
}

// netDialer gives up on a peer that does not accept within a second: peers
// are on the node network, and the next peer or upstream is better than waiting.
var netDialer = net.Dialer{Timeout: time.Second, KeepAlive: 30 * time.Second}
