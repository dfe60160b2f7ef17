package fetch

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// WholeBelow is the size under which a blob is read and verified whole
// before its first byte is sent. Verifying first costs the time to receive
// it (under 4 ms for 4 MiB on the node network, measured by
// BenchmarkFirstByte); streaming instead would turn a lying peer into a
// failed pull attempt, which costs containerd a retry with backoff. Config
// blobs and small layers therefore never reach containerd unverified.
const WholeBelow = 4 << 20

// minProgress is what a peer must send per stall timeout to keep serving: a
// peer that drips a byte a second is as stalled as one that sends nothing.
const minProgress = 64 << 10

// ErrMismatch is the cause of a stream that ended because the blob's bytes
// did not match its digest. The peers that sent them are not asked for
// that digest again for a while.
var ErrMismatch = errors.New("blob from peers does not match its digest")

// errNotHeld: the peer answered 404, it neither holds the blob nor has it
// in flight (yet).
var errNotHeld = errors.New("peer does not have the blob (404)")

// BlobStream is a blob read from peers as it arrives. Bytes are hashed on
// the way through and the final read is only returned once the whole blob
// matches its digest, so a reader that stops at the first error (the
// registry cuts its response) never hands containerd a complete wrong blob.
// A peer that breaks off, stalls or sends too slowly is replaced by the next
// one, resuming with a Range request.
type BlobStream struct {
	// Descriptor is known when OpenBlob returns.
	Descriptor ocispec.Descriptor
	// Peers that sent bytes so far.
	Peers []netip.AddrPort

	m      *Fetcher
	ctx    context.Context
	req    oci.Request
	src    *peerSource
	hash   hash.Hash
	off    int64 // bytes received and hashed
	whole  []byte
	resp   *http.Response
	cancel context.CancelCauseFunc
	stop   func() bool
	err    error
	wait   Wait // for the first request

	// For watch: how long reads waited on the current peer since it last
	// sent minProgress bytes, and when the read in progress began.
	waited    atomic.Int64
	waitStart atomic.Int64
	progress  int
}

// OpenBlob finds peers holding the blob and returns once one of them
// answered with its size, or ErrNoSource. Blobs under WholeBelow are
// received and verified before it returns. The caller must Close the stream.
func (m *Fetcher) OpenBlob(ctx context.Context, req oci.Request) (*BlobStream, error) {
	return m.open(ctx, req, netip.AddrPort{}, Wait{})
}

// OpenBlobFrom opens the blob from the peer that agreed to fetch it (see
// agent/claim), asking it to wait up to wait for the blob to appear in
// flight, and waiting up to the follow wait for its first bytes. If that
// peer fails before its first byte, it returns ErrNoSource at once, for
// upstream: the other peers in flight are followers of the same node, as
// empty-handed, and trying each in turn would only add their timeouts.
// Once bytes flow, a peer that breaks off is resumed from the others.
func (m *Fetcher) OpenBlobFrom(ctx context.Context, req oci.Request, first netip.AddrPort, wait Wait) (*BlobStream, error) {
	wait.Blob, wait.Image = min(wait.Blob, peerproto.MaxWait), min(wait.Image, peerproto.MaxImageWait)
	return m.open(ctx, req, first, wait)
}

func (m *Fetcher) open(ctx context.Context, req oci.Request, first netip.AddrPort, wait Wait) (*BlobStream, error) {
	src, err := m.lookup(ctx, req.Key(), req.Digest)
	if err != nil {
		return nil, err
	}
	s := &BlobStream{m: m, ctx: ctx, req: req, src: src, hash: sha256.New(), Descriptor: ocispec.Descriptor{Digest: req.Digest, Size: -1}, wait: wait}
	var p netip.AddrPort
	var ok bool
	if first.IsValid() {
		p, ok = first, true
		src.skip = append(src.skip, first)
	} else {
		p, ok = m.firstPeer(ctx, src, req.Kind)
	}
	for ; ok; p, ok = s.next() {
		if err := s.connect(p); err != nil {
			if p == first && errors.Is(err, errNotHeld) {
				// Expected when the image's agreement is stale: that node
				// does not pull this blob. The caller falls back.
				m.log.DebugContext(ctx, "agreed fetcher does not have the blob", "peer", p.String(), "digest", req.Digest)
			} else {
				m.log.WarnContext(ctx, "peer failed to serve blob", "peer", p.String(), "digest", req.Digest, "err", err)
			}
			if p == first {
				break
			}
			continue
		}
		if s.Descriptor.Size >= WholeBelow {
			return s, nil
		}
		err := s.readWhole()
		if err == nil {
			return s, nil
		}
		m.log.WarnContext(ctx, "peer failed to serve blob", "peer", p.String(), "digest", req.Digest, "err", err)
		if !errors.Is(err, ErrMismatch) {
			break // no peer left to resume from
		}
		// Start over from the next peer.
		s.off, s.Peers = 0, nil
		s.hash.Reset()
	}
	s.Close()
	return nil, fmt.Errorf("blob %s: %w", req.Digest, ErrNoSource)
}

// next is the next peer, skipping those that sent this digest wrong during
// this stream (the lookup skipped the ones known before).
func (s *BlobStream) next() (netip.AddrPort, bool) {
	for {
		p, ok := s.src.next(s.ctx)
		if !ok || !s.m.bad.has(s.req.Digest, p) {
			return p, ok
		}
	}
}

// connect asks p for the blob from the current offset on.
func (s *BlobStream) connect(p netip.AddrPort) error {
	if s.m.bad.has(s.req.Digest, p) {
		return errors.New("peer sent this digest wrong before")
	}
	s.drop()
	ctx, cancel := context.WithCancelCause(s.ctx)
	rng := ""
	if s.off > 0 {
		rng = peerproto.ResumeRange(s.off)
	}
	resp, err := s.m.do(ctx, http.MethodGet, p, s.req, peerproto.Blobs, s.req.Digest.String(), rng, s.wait)
	s.wait = Wait{}
	if err != nil {
		cancel(nil)
		return err
	}
	if resp.StatusCode == http.StatusNotFound {
		resp.Body.Close()
		cancel(nil)
		s.m.fail("status")
		return errNotHeld
	}
	size, err := peerproto.ContentSize(resp, s.off)
	if err == nil && s.Descriptor.Size >= 0 && size != s.Descriptor.Size {
		err = fmt.Errorf("peer says the blob has %d bytes, another said %d", size, s.Descriptor.Size)
	}
	if err != nil {
		resp.Body.Close()
		cancel(nil)
		s.m.fail("status")
		return err
	}
	s.Descriptor.Size = size
	if s.Descriptor.MediaType == "" {
		s.Descriptor.MediaType = resp.Header.Get("Content-Type")
	}
	s.resp, s.cancel = resp, cancel
	s.Peers = append(s.Peers, p)
	s.waited.Store(0)
	s.progress = 0
	s.stop = s.watch(cancel)
	return nil
}

// watch abandons the current peer when, while this stream waits on it, it
// takes longer than the stall timeout to send minProgress bytes: nothing
// at all, or a drip. Time the reader spends elsewhere (containerd not
// reading yet) is not held against the peer.
func (s *BlobStream) watch(cancel context.CancelCauseFunc) func() bool {
	var t *time.Timer
	tick := max(s.m.stallTimeout/4, time.Millisecond)
	t = time.AfterFunc(tick, func() {
		waited := time.Duration(s.waited.Load())
		if start := s.waitStart.Load(); start != 0 {
			waited += time.Since(time.Unix(0, start))
		}
		if waited > s.m.stallTimeout {
			cancel(fmt.Errorf("peer stalled: under %d bytes in %s", minProgress, s.m.stallTimeout))
			return
		}
		t.Reset(tick)
	})
	return t.Stop
}

// bodyRead reads from the current peer, accounting the wait for watch.
func (s *BlobStream) bodyRead(p []byte) (int, error) {
	start := time.Now()
	s.waitStart.Store(start.UnixNano())
	n, err := s.resp.Body.Read(p)
	s.waitStart.Store(0)
	s.waited.Add(int64(time.Since(start)))
	if s.progress += n; s.progress >= minProgress {
		s.progress = 0
		s.waited.Store(0)
	}
	return n, err
}

// drop closes the current peer's response.
func (s *BlobStream) drop() {
	if s.resp == nil {
		return
	}
	s.stop()
	s.resp.Body.Close()
	s.cancel(nil)
	s.resp = nil
}

// readWhole receives the rest of a small blob into memory and verifies it.
func (s *BlobStream) readWhole() error {
	buf := make([]byte, s.Descriptor.Size)
	for s.off < s.Descriptor.Size {
		if _, err := s.read(buf[s.off:]); err != nil {
			return err
		}
	}
	if s.Descriptor.Size == 0 && digest.FromBytes(nil) != s.req.Digest {
		s.m.fail("digest")
		return fmt.Errorf("peer says %s is empty: %w", s.req.Digest, ErrMismatch)
	}
	s.whole = buf
	return nil
}

// read fills p from the current peer, moving to the next peer when it
// fails; the bytes are hashed and counted. The read that completes the blob
// returns ErrMismatch instead of its bytes when the digest does not match.
func (s *BlobStream) read(p []byte) (int, error) {
	for {
		if s.resp == nil {
			if err := s.resume(); err != nil {
				return 0, err
			}
		}
		want := min(int64(len(p)), s.Descriptor.Size-s.off)
		n, err := s.bodyRead(p[:want])
		if n > 0 {
			s.hash.Write(p[:n])
			s.off += int64(n)
			s.m.fetched(int64(n))
			if s.off == s.Descriptor.Size {
				s.drop()
				if got := digest.NewDigest(digest.SHA256, s.hash); got != s.req.Digest {
					s.m.fail("digest")
					s.m.bad.add(s.req.Digest, s.Peers)
					s.m.log.WarnContext(s.ctx, "blob from peers failed verification; they will not be asked for it again", "peers", s.Peers, "digest", s.req.Digest, "got", got)
					return 0, ErrMismatch
				}
				return n, nil
			}
			return n, nil
		}
		if err != nil {
			if c := context.Cause(s.ctx); c != nil {
				return 0, c
			}
			// A stall or drip cancels the peer's request: say which.
			if c := context.Cause(s.resp.Request.Context()); c != nil {
				err = c
			}
			s.m.fail("short")
			s.m.log.WarnContext(s.ctx, "peer broke off a blob; resuming from the next", "peer", s.Peers[len(s.Peers)-1].String(), "digest", s.req.Digest, "offset", s.off, "size", s.Descriptor.Size, "err", err)
			s.drop()
		}
	}
}

// resume connects to the next peer at the current offset. When the
// lookup has no more, a new one is made, once: nodes that started
// streaming this blob after the stream began (in flight, see
// agent/claim) are only found that way.
func (s *BlobStream) resume() error {
	relooked := false
	for {
		p, ok := s.next()
		if !ok && !relooked {
			relooked = true
			src, err := s.m.lookup(s.ctx, s.req.Key(), s.req.Digest)
			if err != nil {
				return err
			}
			s.src.close()
			src.skip = append(src.skip, s.Peers[len(s.Peers)-1])
			s.src = src
			continue
		}
		if !ok {
			return fmt.Errorf("blob %s after %d of %d bytes: %w", s.req.Digest, s.off, s.Descriptor.Size, ErrNoSource)
		}
		if err := s.connect(p); err != nil {
			s.m.log.WarnContext(s.ctx, "peer failed to resume blob", "peer", p.String(), "digest", s.req.Digest, "offset", s.off, "err", err)
			continue
		}
		return nil
	}
}

// Read implements io.Reader.
func (s *BlobStream) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.whole != nil {
		if len(s.whole) == 0 {
			return 0, io.EOF
		}
		n := copy(p, s.whole)
		s.whole = s.whole[n:]
		return n, nil
	}
	if s.off == s.Descriptor.Size {
		return 0, io.EOF
	}
	n, err := s.read(p)
	if err != nil {
		s.err = err
	}
	return n, err
}

// bufPool holds WriteTo's buffers: reading the peer's socket in 1 MiB
// steps instead of io.Copy's 32 KiB takes a fraction of the syscalls.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// WriteTo implements io.WriterTo, which io.Copy prefers; the bytes and the
// hold-back are those of Read.
func (s *BlobStream) WriteTo(w io.Writer) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	var total int64
	for {
		n, err := s.Read(*bp)
		if n > 0 {
			m, werr := w.Write((*bp)[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Close releases the current peer and the lookup.
func (s *BlobStream) Close() error {
	s.drop()
	s.src.close()
	return nil
}
