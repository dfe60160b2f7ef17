package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ErrUnreachable is wrapped by Ready's error while the store has lost
// containerd and is reconnecting.
var ErrUnreachable = errors.New("containerd unreachable")

// Topics are the containerd event topics that can change what the node
// serves. Containerd 1.6 and 2.x publish all of the image ones; only 2.x
// publishes /content/create, and neither publishes anything when the
// garbage collector removes content, hence the periodic resync.
var Topics = []string{"/images/create", "/images/update", "/images/delete", "/content/create", "/content/delete"}

const (
	dialTimeout = 5 * time.Second
	// syncTimeout bounds one sync so a wedged containerd is noticed.
	syncTimeout = 30 * time.Second
	// minSyncInterval coalesces the event bursts of a pull into few syncs.
	minSyncInterval = 100 * time.Millisecond
	// quietSync is how long the events of a burst must pause before the
	// sync: a sync lists every image and reads their manifests, and run at
	// a pull's first event it competed with the pull for CPU and for
	// containerd (a 10 MB peer pull spent 8 ms more creating its images
	// than without an agent). New content is advertised this much later.
	quietSync = 100 * time.Millisecond
	// maxSyncDelay bounds how long a stream of events defers the sync.
	maxSyncDelay = time.Second
	// catchUpDelay is when the sync after connecting is repeated: containerd
	// registers a subscription some time after the stream opens, and events
	// published in between would otherwise be missed until the next resync.
	catchUpDelay = 500 * time.Millisecond
	// resyncInterval catches what no event announces: content removed by
	// containerd's garbage collector.
	resyncInterval = 30 * time.Second
	minBackoff     = 100 * time.Millisecond
	maxBackoff     = 5 * time.Second
)

// Containerd is the Store of a node's containerd. It serves from an
// in-memory index of the namespace's images, rebuilt whenever containerd
// announces a change; Run keeps it in step.
//
// Descriptor and Open answer only for digests in the index (those Keys
// lists): content that no image references, or that a sync has not seen
// yet, is ErrNotFound, since its media type, which the registry sends as the
// manifest Content-Type, is unknown.
//
// While containerd is unreachable the last index is kept, so Keys does not
// churn across a containerd restart; Ready reports the outage.
type Containerd struct {
	socket     string
	namespace  string
	contentDir string
	log        *slog.Logger
	shared     func(image string) bool

	indexer   *indexer // used by Run's goroutine only
	changed   chan struct{}
	connected chan struct{}

	mu     sync.RWMutex
	idx    *index
	client *client.Client // nil while disconnected
	ready  error
}

var _ Store = (*Containerd)(nil)

// Option sets an optional setting of NewContainerd.
type Option func(*Containerd)

// WithNamespace sets the containerd namespace whose images are served; "k8s.io" by default.
func WithNamespace(ns string) Option { return func(s *Containerd) { s.namespace = ns } }

// WithContentDir sets containerd's content store directory,
// <root>/io.containerd.content.v1.content. Blobs are then opened as files,
// which net/http can send with sendfile, instead of streamed over gRPC.
func WithContentDir(dir string) Option { return func(s *Containerd) { s.contentDir = dir } }

// WithShared limits the store to the images shared reports true for (a
// containerd image name): the others' tags and content are neither listed
// nor served, except content a shared image references too. It keeps a
// private registry's images off the peer network.
func WithShared(shared func(image string) bool) Option {
	return func(s *Containerd) { s.shared = shared }
}

// WithLogger sets the logger; slog.Default() by default.
func WithLogger(l *slog.Logger) Option { return func(s *Containerd) { s.log = l } }

// NewContainerd returns a store of the containerd serving gRPC on socket
// (e.g. /run/containerd/containerd.sock). It is empty and not ready until
// Run has synced with containerd. ctx is not retained.
func NewContainerd(ctx context.Context, socket string, opts ...Option) (*Containerd, error) {
	s := &Containerd{
		socket:    socket,
		namespace: "k8s.io",
		changed:   make(chan struct{}, 1),
		connected: make(chan struct{}, 1),
		idx:       emptyIndex(),
		ready:     errors.New("not yet synced with containerd"),
	}
	for _, o := range opts {
		o(s)
	}
	if s.socket == "" {
		return nil, errors.New("containerd store: no socket path")
	}
	if s.namespace == "" {
		return nil, errors.New("containerd store: empty namespace")
	}
	if s.log == nil {
		s.log = slog.Default().With("component", "store")
	}
	s.log = s.log.With("socket", s.socket, "namespace", s.namespace)
	s.indexer = newIndexer(s.log)
	if s.contentDir != "" {
		// Not fatal: Open falls back to the content API blob by blob.
		// containerd makes blobs/ on its first pull, so only a directory
		// that exists but cannot be read is worth a warning.
		if _, err := os.ReadDir(filepath.Join(s.contentDir, "blobs")); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.WarnContext(ctx, "content directory not readable, reading blobs through containerd", "dir", s.contentDir, "err", err)
		}
	}
	return s, nil
}

// Resolve implements Store.
func (s *Containerd) Resolve(_ context.Context, tagKey string) (digest.Digest, error) {
	s.mu.RLock()
	d, ok := s.idx.tags[tagKey]
	s.mu.RUnlock()
	if !ok {
		return "", fmt.Errorf("%s: %w", tagKey, ErrNotFound)
	}
	return d, nil
}

// Descriptor implements Store.
func (s *Containerd) Descriptor(_ context.Context, dgst digest.Digest) (ocispec.Descriptor, error) {
	s.mu.RLock()
	desc, ok := s.idx.descs[dgst]
	s.mu.RUnlock()
	if !ok {
		return ocispec.Descriptor{}, fmt.Errorf("%s: %w", dgst, ErrNotFound)
	}
	return desc, nil
}

// Open implements Store.
func (s *Containerd) Open(ctx context.Context, dgst digest.Digest) (io.ReadSeekCloser, error) {
	desc, err := s.Descriptor(ctx, dgst)
	if err != nil {
		return nil, err
	}
	if s.contentDir != "" {
		if f := s.openFile(ctx, desc); f != nil {
			return f, nil
		}
	}
	s.mu.RLock()
	c, ready := s.client, s.ready
	s.mu.RUnlock()
	if c == nil {
		return nil, fmt.Errorf("opening %s: %w", dgst, ready)
	}
	ra, err := c.ContentStore().ReaderAt(namespaces.WithNamespace(ctx, s.namespace), desc)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("%s: %w", dgst, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dgst, err)
	}
	return &readerAtSeeker{SectionReader: io.NewSectionReader(ra, 0, ra.Size()), ra: ra}, nil
}

// openFile opens the blob in the content directory, or returns nil for
// Open to go through the content API, which knows best why it cannot.
func (s *Containerd) openFile(ctx context.Context, desc ocispec.Descriptor) *os.File {
	// The digest came from containerd's index, so it is well formed and
	// cannot climb out of the directory.
	path := filepath.Join(s.contentDir, "blobs", desc.Digest.Algorithm().String(), desc.Digest.Encoded())
	f, err := os.Open(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			s.log.DebugContext(ctx, "opening blob file", "path", path, "err", err)
		}
		return nil
	}
	fi, err := f.Stat()
	if err != nil || fi.Size() != desc.Size {
		f.Close()
		return nil
	}
	return f
}

// AbortIngest drops what containerd has written so far of dgst. A blob
// response that was cut because its bytes were wrong leaves them in
// containerd's ingest, and a retry would resume from them and fail its
// commit again; without the ingest the retry starts afresh.
func (s *Containerd) AbortIngest(ctx context.Context, dgst digest.Digest) error {
	s.mu.RLock()
	c, ready := s.client, s.ready
	s.mu.RUnlock()
	if c == nil {
		return fmt.Errorf("aborting the ingest of %s: %w", dgst, ready)
	}
	ctx = namespaces.WithNamespace(ctx, s.namespace)
	cs := c.ContentStore()
	sts, err := cs.ListStatuses(ctx)
	if err != nil {
		return fmt.Errorf("listing ingests: %w", err)
	}
	var errs []error
	for _, st := range sts {
		// A pull's ref is "<kind>-<digest>" (remotes.MakeRefKey).
		if strings.HasSuffix(st.Ref, "-"+dgst.String()) {
			if err := cs.Abort(ctx, st.Ref); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

type readerAtSeeker struct {
	*io.SectionReader
	ra content.ReaderAt
}

func (r *readerAtSeeker) Close() error { return r.ra.Close() }

// Keys implements Store.
func (s *Containerd) Keys() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.idx.keys)
}

// Changed implements Store.
func (s *Containerd) Changed() <-chan struct{} { return s.changed }

// Connected receives once Run has synced with a containerd it (re)connected
// to: at start, and after containerd restarted, when its configuration may
// have changed. Signals coalesce while nobody receives.
func (s *Containerd) Connected() <-chan struct{} { return s.connected }

// Ready implements Store.
func (s *Containerd) Ready() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.ready
}

// Run connects to containerd, syncs and follows its events until ctx is
// done, reconnecting with backoff whenever containerd goes away. It returns
// nil once ctx is done. Call it once.
func (s *Containerd) Run(ctx context.Context) error {
	backoff := minBackoff
	failures := 0
	for {
		synced, err := s.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if synced {
			backoff, failures = minBackoff, 0
		}
		failures++
		s.mu.Lock()
		s.ready = fmt.Errorf("%w at %s: %w", ErrUnreachable, s.socket, err)
		s.mu.Unlock()
		// One warning per outage, not one per attempt.
		level := slog.LevelDebug
		if failures == 1 {
			level = slog.LevelWarn
		}
		s.log.Log(ctx, level, "lost containerd, reconnecting", "err", err, "retryIn", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// session is one connection to containerd: it returns why it ended, and
// whether it got as far as a sync.
func (s *Containerd) session(ctx context.Context) (synced bool, err error) {
	c, err := client.New(s.socket, client.WithDefaultNamespace(s.namespace), client.WithTimeout(dialTimeout))
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithCancel(namespaces.WithNamespace(ctx, s.namespace))
	defer func() {
		cancel()
		s.mu.Lock()
		s.client = nil
		s.mu.Unlock()
		c.Close()
	}()

	// The client dials lazily; fail fast here rather than in Subscribe.
	vctx, vcancel := context.WithTimeout(ctx, dialTimeout)
	v, err := c.Version(vctx)
	vcancel()
	if err != nil {
		return false, err
	}

	// Subscribe before the first sync so that no change falls in between.
	evs, errs := s.subscribe(ctx, c)
	s.mu.Lock()
	s.client = c
	s.mu.Unlock()
	if err := s.sync(ctx, c); err != nil {
		return false, err
	}
	s.log.InfoContext(ctx, "in step with containerd", "version", v.Version, "keys", len(s.Keys()))
	select {
	case s.connected <- struct{}{}:
	default:
	}
	return true, s.follow(ctx, c, evs, errs)
}

// subscribe asks containerd for the events of Topics in our namespace.
func (s *Containerd) subscribe(ctx context.Context, c *client.Client) (<-chan *events.Envelope, <-chan error) {
	var filters []string
	for _, t := range Topics {
		filters = append(filters, "namespace=="+strconv.Quote(s.namespace)+",topic=="+strconv.Quote(t))
	}
	return c.EventService().Subscribe(ctx, filters...)
}

// follow syncs again after events (once they pause, see quietSync, and at
// most every minSyncInterval), catchUpDelay after connecting, and every
// resyncInterval, until ctx is done or the event stream fails.
func (s *Containerd) follow(ctx context.Context, c *client.Client, evs <-chan *events.Envelope, errs <-chan error) error {
	timer := time.NewTimer(catchUpDelay)
	defer timer.Stop()
	pending := true     // a sync is due when timer fires
	var first time.Time // the first event of the pending burst, if any
	lastSync := time.Now()
	resync := time.NewTicker(resyncInterval)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return fmt.Errorf("containerd events: %w", err)
		case ev := <-evs:
			s.log.DebugContext(ctx, "containerd event", "topic", ev.Topic)
			now := time.Now()
			if !pending {
				pending, first = true, now
			}
			if !first.IsZero() {
				timer.Reset(syncWait(now, first, lastSync))
			}
		case <-resync.C:
			if !pending {
				pending = true
				timer.Reset(0)
			}
		case <-timer.C:
			// An event arriving during this sync schedules another, so the
			// last event of a burst is always followed by a sync.
			pending, first = false, time.Time{}
			lastSync = time.Now()
			if err := s.sync(ctx, c); err != nil {
				return err
			}
		}
	}
}

// syncWait is how long after an event at now the sync is due: once the
// events pause for quietSync, but no later than maxSyncDelay after the
// burst's first event, and no sooner than minSyncInterval after the last
// sync.
func syncWait(now, first, lastSync time.Time) time.Duration {
	wait := min(quietSync, maxSyncDelay-now.Sub(first))
	return max(wait, minSyncInterval-now.Sub(lastSync), 0)
}

// sync rebuilds the index from containerd and signals Changed if Keys changed.
func (s *Containerd) sync(ctx context.Context, c *client.Client) error {
	ctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	start := time.Now()
	imgs, err := c.ImageService().List(ctx)
	if err != nil {
		return fmt.Errorf("listing images: %w", err)
	}
	if s.shared != nil {
		imgs = slices.DeleteFunc(imgs, func(img images.Image) bool { return !s.shared(img.Name) })
	}
	cs := c.ContentStore()
	present := map[digest.Digest]int64{}
	if err := cs.Walk(ctx, func(info content.Info) error {
		present[info.Digest] = info.Size
		return nil
	}); err != nil {
		return fmt.Errorf("listing content: %w", err)
	}
	idx, err := s.indexer.build(ctx, imgs, present, cs)
	if err != nil {
		return err
	}
	s.mu.Lock()
	old := s.idx
	s.idx = idx
	s.ready = nil
	s.mu.Unlock()
	if slices.Equal(old.keys, idx.keys) {
		return nil
	}
	s.log.DebugContext(ctx, "index changed", "images", len(imgs), "tags", len(idx.tags), "digests", len(idx.descs), "took", time.Since(start))
	select {
	case s.changed <- struct{}{}:
	default:
	}
	return nil
}
