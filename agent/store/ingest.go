package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// InFlight finds blobs this node's containerd is still writing, or has
// written but not yet tied to an image (the layers of a pull in progress),
// straight in containerd's content directory, so that peers can stream
// them as they grow.
//
// containerd 1.6 and 2.x lay ingests out alike: <content>/ingest/<dir>/
// holds `ref` (the writer's ref, "<namespace>/<id>/layer-sha256:<hex>" for
// a pull), `total` (the expected size) and `data` (the bytes so far). On
// commit `data` is renamed into blobs/sha256/<hex>, so an open reader keeps
// reading the same file to its end.
type InFlight struct {
	dir   string
	stall time.Duration
	first time.Duration
	poll  time.Duration
}

// FirstByteWait is how long a reader waits for the first byte of an ingest
// that has none yet: containerd opens it before it asks for the blob, and
// on a busy node its first bytes from upstream can take seconds longer
// than the stall timeout. The nodes that wait for this one are as patient.
const FirstByteWait = peerproto.FollowWait

// NewInFlight reads ingests under contentDir. A reader that reaches the
// writer's offset waits for more, and gives up after stall without growth,
// or after the longer of stall and FirstByteWait while the ingest is
// still empty.
func NewInFlight(contentDir string, stall time.Duration) *InFlight {
	return &InFlight{dir: contentDir, stall: stall, first: max(stall, FirstByteWait), poll: 5 * time.Millisecond}
}

// Growing is a blob being written, read from an offset on. Reads wait for
// the writer and fail once it stopped for the stall timeout.
type Growing struct {
	f     *os.File
	dir   string // the ingest directory; "" when the blob is committed
	total int64
	off   int64
	stall time.Duration
	first time.Duration // the stall timeout while the ingest is empty
	poll  time.Duration
	ctx   context.Context
}

// Size is the blob's full size.
func (g *Growing) Size() int64 { return g.total }

// Name is the file read, for logs.
func (g *Growing) Name() string { return g.f.Name() }

// Impatient makes the reader wait for the first byte no longer than for
// any other: for a reader that did not agree to wait for this node (a
// stale empty ingest then costs it the stall timeout, not FirstByteWait).
func (g *Growing) Impatient() { g.first = g.stall }

// Open finds dgst and positions the reader at off. With wait > 0 it waits
// that long for the ingest to appear (a peer that agreed to fetch a blob is
// asked before its containerd has started). ErrNotFound when there is none.
func (s *InFlight) Open(ctx context.Context, dgst digest.Digest, off int64, wait time.Duration) (*Growing, error) {
	deadline := time.Now().Add(wait)
	for {
		g, err := s.open(dgst)
		if err == nil {
			if off > g.total {
				g.f.Close()
				return nil, fmt.Errorf("offset %d is past the end of %s (%d bytes)", off, dgst, g.total)
			}
			g.off, g.ctx = off, ctx
			return g, nil
		}
		if !errors.Is(err, ErrNotFound) || time.Now().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// Size is the full size of dgst as containerd expects it while it writes
// it (or has it, outside any image yet), false when containerd is neither
// writing nor holding it.
func (s *InFlight) Size(dgst digest.Digest) (int64, bool) {
	g, err := s.open(dgst)
	if err != nil {
		return 0, false
	}
	g.Close()
	return g.total, true
}

func (s *InFlight) open(dgst digest.Digest) (*Growing, error) {
	g := &Growing{stall: s.stall, first: s.first, poll: s.poll}
	// A committed blob the index does not list yet: complete, no waiting.
	if f, err := os.Open(s.blobPath(dgst)); err == nil {
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		g.f, g.total = f, fi.Size()
		return g, nil
	}
	ingests := filepath.Join(s.dir, "ingest")
	entries, err := os.ReadDir(ingests)
	if err != nil {
		return nil, fmt.Errorf("%s in flight: %w", dgst, ErrNotFound)
	}
	suffix := "-" + dgst.String()
	for _, e := range entries {
		dir := filepath.Join(ingests, e.Name())
		ref, err := os.ReadFile(filepath.Join(dir, "ref"))
		if err != nil || !strings.HasSuffix(string(ref), suffix) {
			continue
		}
		// Without a total the size is unknown and the bytes cannot be
		// offered with a Content-Length.
		t, err := os.ReadFile(filepath.Join(dir, "total"))
		if err != nil {
			continue
		}
		total, err := strconv.ParseInt(strings.TrimSpace(string(t)), 10, 64)
		if err != nil || total <= 0 {
			continue
		}
		f, err := os.Open(filepath.Join(dir, "data"))
		if err != nil {
			continue
		}
		g.f, g.dir, g.total = f, dir, total
		return g, nil
	}
	return nil, fmt.Errorf("%s in flight: %w", dgst, ErrNotFound)
}

func (s *InFlight) blobPath(dgst digest.Digest) string {
	return filepath.Join(s.dir, "blobs", dgst.Algorithm().String(), dgst.Encoded())
}

// Committed reads a blob containerd has committed, if it is at most limit
// bytes: the manifest of a pull in progress, before an image names it.
func (s *InFlight) Committed(dgst digest.Digest, limit int64) ([]byte, error) {
	f, err := os.Open(s.blobPath(dgst))
	if err != nil {
		return nil, fmt.Errorf("%s committed: %w", dgst, ErrNotFound)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s has over %d bytes", dgst, limit)
	}
	return b, nil
}

// Read implements io.Reader.
func (g *Growing) Read(p []byte) (int, error) {
	if g.off >= g.total {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), g.total-g.off)]
	var waited time.Duration
	for {
		n, err := g.f.ReadAt(p, g.off)
		if n > 0 {
			g.off += int64(n)
			return n, nil
		}
		if err != nil && err != io.EOF {
			return 0, err
		}
		if err := g.pause(&waited); err != nil {
			return 0, err
		}
	}
}

// WriteTo implements io.WriterTo, which io.Copy prefers: what the writer
// has written so far goes to w in one piece of the file, which a
// connection's ReadFrom sends with sendfile, instead of 32 KiB reads and
// writes (a node that fetches for a burst serves every follower so).
func (g *Growing) WriteTo(w io.Writer) (int64, error) {
	var total int64
	var waited time.Duration
	for g.off < g.total {
		fi, err := g.f.Stat()
		if err != nil {
			return total, err
		}
		avail := min(fi.Size(), g.total) - g.off
		if avail <= 0 {
			if err := g.pause(&waited); err != nil {
				return total, err
			}
			continue
		}
		waited = 0
		if _, err := g.f.Seek(g.off, io.SeekStart); err != nil {
			return total, err
		}
		n, err := io.Copy(w, &io.LimitedReader{R: g.f, N: avail})
		g.off += n
		total += n
		if err != nil {
			return total, err
		}
		if n < avail {
			return total, io.ErrUnexpectedEOF
		}
	}
	return total, nil
}

// pause waits one poll at the writer's offset, and fails once the writer
// stopped for the stall timeout (the first-byte wait while the file is
// still empty, its writer waiting for its source) or abandoned the blob.
func (g *Growing) pause(waited *time.Duration) error {
	limit := g.stall
	if g.off == 0 {
		limit = g.first
	}
	if *waited >= limit {
		return fmt.Errorf("blob in flight stopped growing at %d of %d bytes for %s", g.off, g.total, limit)
	}
	// A writer that paused for a while is polled ten times less often:
	// in a burst every follower of a node waits here for that node's
	// first bytes from upstream, for seconds.
	step, slow := g.poll, *waited >= 20*g.poll
	if slow {
		step = 10 * g.poll
	}
	if g.dir != "" && (*waited == 0 || slow) {
		if _, err := os.Stat(g.dir); errors.Is(err, os.ErrNotExist) {
			// Committed (the file was renamed whole) or abandoned.
			if fi, err := g.f.Stat(); err == nil && fi.Size() < g.total {
				return fmt.Errorf("blob in flight was abandoned at %d of %d bytes", fi.Size(), g.total)
			}
		}
	}
	t := time.NewTimer(step)
	defer t.Stop()
	select {
	case <-g.ctx.Done():
		return g.ctx.Err()
	case <-t.C:
		*waited += step
	}
	return nil
}

// Close implements io.Closer.
func (g *Growing) Close() error { return g.f.Close() }
