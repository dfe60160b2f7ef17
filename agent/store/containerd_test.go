package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestTagKey(t *testing.T) {
	d := "sha256:" + strings.Repeat("ab", 32)
	for name, want := range map[string]string{
		"docker.io/library/nginx:1.27":       "docker.io/library/nginx:1.27",
		"10.1.2.3:5000/team/app:v1":          "10.1.2.3:5000/team/app:v1",
		"registry.k8s.io/pause:3.10":         "registry.k8s.io/pause:3.10",
		"localhost:5000/a/b/c:latest":        "localhost:5000/a/b/c:latest",
		d:                                    "",
		"docker.io/library/nginx@" + d:       "",
		"docker.io/library/nginx:1.27@" + d:  "",
		"10.1.2.3:5000/team/app":             "", // no tag
		"nginx:1.27":                         "", // short name: registry unknown
		"docker.io/library/nginx:bad tag!":   "",
		"docker.io/library/nginx:" + d[7:]:   "docker.io/library/nginx:" + d[7:],
		"docker.io/library/UPPER:1":          "",
		"[fd00::1]:5000/team/app:v1":         "[fd00::1]:5000/team/app:v1",
		"example.com:443/deep/path/name:v-1": "example.com:443/deep/path/name:v-1",
	} {
		if got := tagKey(name); got != want {
			t.Errorf("tagKey(%q) = %q, want %q", name, got, want)
		}
	}
}

// TestContainerd runs the store against real containerds of each
// supported version.
func TestContainerd(t *testing.T) {
	for _, v := range containerdBinaries() {
		t.Run(v.name, func(t *testing.T) { testStore(t, v.bin) })
	}
}

func testStore(t *testing.T, bin string) {
	ctd := startContainerd(t, bin)
	cl := ctd.Client(t, "k8s.io")
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")

	// Image a: an index of two platforms, only one of them pulled, under
	// the three names CRI gives an image.
	a := makeImage("a", nil, false)
	a.push(t, ctx, cl, "docker.io/library/test:v1", "docker.io/library/test@"+a.root().Digest.String(), a.config.Digest.String())
	// An image in another namespace is not served.
	makeImage("other", nil, false).push(t, namespaces.WithNamespace(t.Context(), "default"), cl, "docker.io/library/other:v1")

	withDir := runStore(t, ctd, WithContentDir(ctd.ContentDir))
	viaAPI := runStore(t, ctd)
	stores := map[string]*Containerd{"content dir": withDir, "content API": viaAPI}
	for name, s := range stores {
		waitFor(t, name+" ready", 20*time.Second, s.Ready)
	}

	want := a.keys("docker.io/library/test:v1")
	for name, s := range stores {
		if got := s.Keys(); !slices.Equal(got, want) {
			t.Fatalf("%s: Keys() = %q\nwant %q", name, got, want)
		}
		checkImage(t, name, s, a, "docker.io/library/test:v1")
		if _, err := s.Descriptor(ctx, a.absent.Digest); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Descriptor(absent manifest) = %v, want ErrNotFound", name, err)
		}
		if _, err := s.Open(ctx, a.absent.Digest); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Open(absent manifest) = %v, want ErrNotFound", name, err)
		}
		for _, key := range []string{"docker.io/library/test:v2", "docker.io/library/other:v1", a.config.Digest.String()} {
			if _, err := s.Resolve(ctx, key); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), key) {
				t.Errorf("%s: Resolve(%q) = %v, want ErrNotFound naming the key", name, key, err)
			}
		}
	}
	checkOpenKind(t, withDir, viaAPI, a.layers[0].Digest)

	drain(withDir.Changed())
	pastCatchUp()

	// An image created while the store runs arrives by event; it shares
	// a layer with image a.
	b := makeImage("b", a.blobs[a.layers[0].Digest], false)
	b.push(t, ctx, cl, "10.1.2.3:5000/team/app:v1")
	want = union(a.keys("docker.io/library/test:v1"), b.keys("10.1.2.3:5000/team/app:v1"))
	waitKeys(t, withDir, want)
	// The store swaps its index before it signals, so the keys may be
	// seen a moment before the signal is sent.
	select {
	case <-withDir.Changed():
	case <-time.After(5 * time.Second):
		t.Error("Changed not signalled after keys changed")
	}
	checkImage(t, "after create", withDir, b, "10.1.2.3:5000/team/app:v1")

	// The platform a's index lacked is pulled later: its content appears
	// and the image record is updated, as a pull does.
	a.pushAbsent(t, ctx, cl)
	img, err := cl.ImageService().Get(ctx, "docker.io/library/test:v1")
	if err != nil {
		t.Fatal(err)
	}
	img.Labels = map[string]string{"pulled": "arm64"}
	if _, err := cl.ImageService().Update(ctx, img, "labels"); err != nil {
		t.Fatal(err)
	}
	want = union(want, []string{a.absent.Digest.String(), a.absentConfig.Digest.String()})
	waitKeys(t, withDir, want)

	// Content removed under an image (as discard_unpacked_layers does)
	// drops out.
	if err := cl.ContentStore().Delete(ctx, a.layers[1].Digest); err != nil {
		t.Fatal(err)
	}
	want = slices.DeleteFunc(want, func(k string) bool { return k == a.layers[1].Digest.String() })
	waitKeys(t, withDir, want)
	if _, err := withDir.Open(ctx, a.layers[1].Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("Open(deleted layer) = %v, want ErrNotFound", err)
	}

	// Deleting all of a's names drops a's content but not the layer b shares.
	for _, name := range []string{"docker.io/library/test:v1", "docker.io/library/test@" + a.root().Digest.String(), a.config.Digest.String()} {
		if err := cl.ImageService().Delete(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	want = b.keys("10.1.2.3:5000/team/app:v1")
	waitKeys(t, withDir, want)
	waitKeys(t, viaAPI, want)

	// Containerd crashes: the store says so, keeps its keys, and catches
	// up once containerd is back, and says it connected again.
	select {
	case <-withDir.Connected():
	default:
		t.Error("no Connected signal for the first connection")
	}
	ctd.Kill(t)
	waitFor(t, "Ready reporting the outage", 10*time.Second, func() error {
		if err := withDir.Ready(); !errors.Is(err, ErrUnreachable) {
			return fmt.Errorf("Ready() = %v, want ErrUnreachable", err)
		}
		return nil
	})
	if got := withDir.Keys(); !slices.Equal(got, want) {
		t.Errorf("Keys() while containerd is down = %q, want %q", got, want)
	}
	if _, err := viaAPI.Open(ctx, b.config.Digest); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("Open through the API while containerd is down = %v, want an error other than ErrNotFound", err)
	}
	ctd.Start(t)
	waitFor(t, "ready after restart", 20*time.Second, withDir.Ready)
	select {
	case <-withDir.Connected():
	case <-time.After(5 * time.Second):
		t.Error("no Connected signal after containerd restarted")
	}
	if got := withDir.Keys(); !slices.Equal(got, want) {
		t.Errorf("Keys() after restart = %q, want %q", got, want)
	}
	// Docker media types are walked and served alike.
	pastCatchUp()
	c := makeImage("c", nil, true)
	c.push(t, ctx, cl, "docker.io/library/c:v1")
	want = union(want, c.keys("docker.io/library/c:v1"))
	waitKeys(t, withDir, want)
	waitKeys(t, viaAPI, want)
	checkImage(t, "after restart", viaAPI, c, "docker.io/library/c:v1")
}

// TestContainerdTopics records which event topics each containerd version
// publishes for what the store does to content and images, as a record of
// what the store can rely on.
func TestContainerdTopics(t *testing.T) {
	for _, v := range containerdBinaries() {
		t.Run(v.name, func(t *testing.T) {
			ctd := startContainerd(t, v.bin)
			cl := ctd.Client(t, "k8s.io")
			ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
			subCtx, cancel := context.WithCancel(ctx)
			evs, errs := cl.EventService().Subscribe(subCtx)
			var (
				mu     sync.Mutex
				topics []string
				done   = make(chan struct{})
			)
			go func() {
				defer close(done)
				for {
					select {
					case ev := <-evs:
						mu.Lock()
						topics = append(topics, ev.Topic)
						mu.Unlock()
					case <-errs:
						return
					}
				}
			}()
			time.Sleep(200 * time.Millisecond) // let the subscription register

			img := makeImage("t", nil, false)
			img.push(t, ctx, cl, "docker.io/library/t:v1")
			got, err := cl.ImageService().Get(ctx, "docker.io/library/t:v1")
			if err != nil {
				t.Fatal(err)
			}
			got.Labels = map[string]string{"x": "y"}
			if _, err := cl.ImageService().Update(ctx, got, "labels"); err != nil {
				t.Fatal(err)
			}
			if err := cl.ContentStore().Delete(ctx, img.layers[1].Digest); err != nil {
				t.Fatal(err)
			}
			if err := cl.ImageService().Delete(ctx, "docker.io/library/t:v1", images.SynchronousDelete()); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			cancel()
			<-done

			mu.Lock()
			defer mu.Unlock()
			seen := map[string]bool{}
			for _, tp := range topics {
				seen[tp] = true
			}
			t.Logf("%s published %q", v.name, topics)
			want := []string{"/images/create", "/images/update", "/images/delete", "/content/delete"}
			if ctd.Major >= 2 {
				want = append(want, "/content/create")
			}
			for _, tp := range want {
				if !seen[tp] {
					t.Errorf("%s did not publish %s", v.name, tp)
				}
			}
			for tp := range seen {
				if strings.HasPrefix(tp, "/images/") || strings.HasPrefix(tp, "/content/") {
					if !slices.Contains(Topics, tp) {
						t.Errorf("%s published %s, which the store does not follow", v.name, tp)
					}
				}
			}
		})
	}
}

func TestNewContainerdNeedsSocket(t *testing.T) {
	if _, err := NewContainerd(t.Context(), ""); err == nil {
		t.Error("NewContainerd without a socket succeeded")
	}
}

// runStore runs a store of ctd's k8s.io namespace until the test ends.
func runStore(t *testing.T, ctd *testContainerd, opts ...Option) *Containerd {
	t.Helper()
	log := slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts = append([]Option{WithLogger(log)}, opts...)
	s, err := NewContainerd(t.Context(), ctd.Socket, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Ready(); err == nil {
		t.Error("Ready() = nil before Run")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run() = %v", err)
		}
	})
	return s
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// testImage is a generated image: an index (when it has one) of a pulled
// manifest and an absent one, each with a config and layers.
type testImage struct {
	index        *ocispec.Descriptor
	manifest     ocispec.Descriptor
	config       ocispec.Descriptor
	layers       []ocispec.Descriptor
	absent       ocispec.Descriptor // the other platform's manifest
	absentConfig ocispec.Descriptor
	blobs        map[digest.Digest][]byte
	labels       map[digest.Digest]map[string]string // GC references, as a pull sets them
	absentBlobs  []ocispec.Descriptor                // written by pushAbsent
}

// makeImage generates an image; seed makes its content unique. The first
// layer is sharedLayer when given. Images with a nil sharedLayer have an
// index; the others are a lone manifest. docker picks Docker's media types
// instead of OCI's.
func makeImage(seed string, sharedLayer []byte, docker bool) *testImage {
	mtIndex, mtManifest, mtConfig, mtLayer := ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageLayerGzip
	if docker {
		mtIndex, mtManifest, mtConfig, mtLayer = images.MediaTypeDockerSchema2ManifestList, images.MediaTypeDockerSchema2Manifest, images.MediaTypeDockerSchema2Config, images.MediaTypeDockerSchema2LayerGzip
	}
	img := &testImage{blobs: map[digest.Digest][]byte{}, labels: map[digest.Digest]map[string]string{}}
	add := func(mt string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		img.blobs[d.Digest] = b
		return d
	}
	rnd := rand.New(rand.NewChaCha8([32]byte([]byte(fmt.Sprintf("%-32s", seed)))))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.Uint32())
		}
		return b
	}
	l0 := sharedLayer
	if l0 == nil {
		l0 = random(300 << 10)
	}
	img.layers = []ocispec.Descriptor{
		add(mtLayer, l0),
		add(mtLayer, random(1000)),
	}
	manifest := func(arch string, layers []ocispec.Descriptor) (m, cfg ocispec.Descriptor) {
		cb, _ := json.Marshal(map[string]any{"architecture": arch, "os": "linux", "seed": seed})
		cfg = add(mtConfig, cb)
		mb, _ := json.Marshal(ocispec.Manifest{
			Versioned: specs.Versioned{SchemaVersion: 2},
			MediaType: mtManifest,
			Config:    cfg,
			Layers:    layers,
		})
		m = add(mtManifest, mb)
		labels := map[string]string{"containerd.io/gc.ref.content.config": cfg.Digest.String()}
		for i, l := range layers {
			labels[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", i)] = l.Digest.String()
		}
		img.labels[m.Digest] = labels
		m.Platform = &ocispec.Platform{Architecture: arch, OS: "linux"}
		return m, cfg
	}
	img.manifest, img.config = manifest("amd64", img.layers)
	img.absent, img.absentConfig = manifest("arm64", img.layers[:1])
	img.absentBlobs = []ocispec.Descriptor{img.absentConfig, img.absent}
	if sharedLayer != nil {
		img.manifest.Platform = nil
		return img
	}
	ib, _ := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: mtIndex,
		Manifests: []ocispec.Descriptor{img.manifest, img.absent},
	})
	idx := add(mtIndex, ib)
	img.index = &idx
	img.labels[idx.Digest] = map[string]string{
		"containerd.io/gc.ref.content.m.0": img.manifest.Digest.String(),
		"containerd.io/gc.ref.content.m.1": img.absent.Digest.String(),
	}
	return img
}

func (img *testImage) root() ocispec.Descriptor {
	if img.index != nil {
		return *img.index
	}
	return img.manifest
}

// present is the content push writes, children before parents as a pull does.
func (img *testImage) present() []ocispec.Descriptor {
	p := append(slices.Clone(img.layers), img.config, img.manifest)
	if img.index != nil {
		p = append(p, *img.index)
	}
	return p
}

// push writes the image's content but not the absent manifest's, and
// creates image records for names, under a lease so that the garbage
// collector cannot take the content before the records hold it.
func (img *testImage) push(t *testing.T, ctx context.Context, cl *client.Client, names ...string) {
	t.Helper()
	ctx, release, err := cl.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer release(ctx)
	img.write(t, ctx, cl, img.present())
	for _, name := range names {
		if _, err := cl.ImageService().Create(ctx, images.Image{Name: name, Target: img.root()}); err != nil {
			t.Fatalf("creating image %s: %v", name, err)
		}
	}
}

// pushAbsent writes the content of the platform push left out.
func (img *testImage) pushAbsent(t *testing.T, ctx context.Context, cl *client.Client) {
	t.Helper()
	ctx, release, err := cl.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer release(ctx)
	img.write(t, ctx, cl, img.absentBlobs)
}

func (img *testImage) write(t *testing.T, ctx context.Context, cl *client.Client, descs []ocispec.Descriptor) {
	t.Helper()
	for _, d := range descs {
		b := img.blobs[d.Digest]
		if err := content.WriteBlob(ctx, cl.ContentStore(), d.Digest.String(), bytes.NewReader(b), d, content.WithLabels(img.labels[d.Digest])); err != nil {
			t.Fatalf("writing %s: %v", d.Digest, err)
		}
	}
}

// keys is what a store holding img under tag lists.
func (img *testImage) keys(tag string) []string {
	k := []string{tag}
	for _, d := range img.present() {
		k = append(k, d.Digest.String())
	}
	return union(k)
}

// checkImage checks Resolve, Descriptor and Open for all of img's content.
func checkImage(t *testing.T, name string, s *Containerd, img *testImage, tag string) {
	t.Helper()
	ctx := t.Context()
	if d, err := s.Resolve(ctx, tag); err != nil || d != img.root().Digest {
		t.Errorf("%s: Resolve(%q) = %s, %v; want %s", name, tag, d, err, img.root().Digest)
	}
	for _, want := range img.present() {
		desc, err := s.Descriptor(ctx, want.Digest)
		if err != nil {
			t.Errorf("%s: Descriptor(%s): %v", name, want.Digest, err)
			continue
		}
		if desc.MediaType != want.MediaType || desc.Size != want.Size || desc.Digest != want.Digest {
			t.Errorf("%s: Descriptor(%s) = %+v, want %+v", name, want.Digest, desc, want)
		}
		f, err := s.Open(ctx, want.Digest)
		if err != nil {
			t.Errorf("%s: Open(%s): %v", name, want.Digest, err)
			continue
		}
		checkBytes(t, name, f, img.blobs[want.Digest])
		if err := f.Close(); err != nil {
			t.Errorf("%s: Close: %v", name, err)
		}
	}
}

// checkBytes reads r whole, then seeks about in it.
func checkBytes(t *testing.T, name string, r io.ReadSeeker, want []byte) {
	t.Helper()
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("%s: read %d bytes, %v; want the %d bytes written", name, len(got), err, len(want))
		return
	}
	n := int64(len(want))
	for _, off := range []int64{n / 2, 0, n - 1} {
		if pos, err := r.Seek(off, io.SeekStart); err != nil || pos != off {
			t.Errorf("%s: Seek(%d) = %d, %v", name, off, pos, err)
			continue
		}
		buf := make([]byte, min(100, n-off))
		if _, err := io.ReadFull(r, buf); err != nil || !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
			t.Errorf("%s: read at %d: %v, wrong bytes", name, off, err)
		}
	}
	if pos, err := r.Seek(-10, io.SeekEnd); err != nil || pos != n-10 {
		t.Errorf("%s: Seek(-10, end) = %d, %v", name, pos, err)
	} else if tail, err := io.ReadAll(r); err != nil || !bytes.Equal(tail, want[n-10:]) {
		t.Errorf("%s: reading the last 10 bytes: %v, got %d bytes", name, err, len(tail))
	}
}

// checkOpenKind checks that a content directory is used when given: net/http
// only sends an *os.File with sendfile.
func checkOpenKind(t *testing.T, withDir, viaAPI *Containerd, dgst digest.Digest) {
	t.Helper()
	for s, wantFile := range map[*Containerd]bool{withDir: true, viaAPI: false} {
		r, err := s.Open(t.Context(), dgst)
		if err != nil {
			t.Fatal(err)
		}
		if _, isFile := r.(*os.File); isFile != wantFile {
			t.Errorf("Open returned %T; want an *os.File: %v", r, wantFile)
		}
		r.Close()
	}
}

func waitKeys(t *testing.T, s *Containerd, want []string) {
	t.Helper()
	waitFor(t, "keys", 5*time.Second, func() error {
		if got := s.Keys(); !slices.Equal(got, want) {
			return fmt.Errorf("Keys() = %q\nwant %q", got, want)
		}
		return nil
	})
}

// waitFor polls cond until it returns nil, failing the test with its last
// error after timeout.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting %v for %s: %v", timeout, what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pastCatchUp waits for the sync that follows connecting, so that changes
// after it can reach the store only by event.
func pastCatchUp() {
	time.Sleep(catchUpDelay + 200*time.Millisecond)
}

func drain(c <-chan struct{}) {
	select {
	case <-c:
	default:
	}
}

// union returns the sorted, deduplicated keys of all sets.
func union(sets ...[]string) []string {
	var u []string
	for _, s := range sets {
		u = append(u, s...)
	}
	slices.Sort(u)
	return slices.Compact(u)
}

// TestSyncWait: the sync waits for a pull's events to pause, so that it
// does not compete with the pull, yet a stream of events cannot defer it
// for long, and syncs stay apart.
func TestSyncWait(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	long := t0.Add(-time.Hour)
	for _, tc := range []struct {
		name            string
		now, first, was time.Time
		want            time.Duration
	}{
		{"first event of a burst waits for a pause", t0, t0, long, quietSync},
		{"each event moves it", t0.Add(300 * time.Millisecond), t0, long, quietSync},
		{"a long burst is synced in the meantime", t0.Add(maxSyncDelay - 30*time.Millisecond), t0, long, 30 * time.Millisecond},
		{"past the bound at once", t0.Add(2 * maxSyncDelay), t0, long, 0},
		{"not sooner than minSyncInterval after the last sync", t0.Add(2 * maxSyncDelay), t0, t0.Add(2*maxSyncDelay - 10*time.Millisecond), minSyncInterval - 10*time.Millisecond},
	} {
		if got := syncWait(tc.now, tc.first, tc.was); got != tc.want {
			t.Errorf("%s: waits %s, want %s", tc.name, got, tc.want)
		}
	}
}
