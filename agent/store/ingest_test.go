package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// A blob containerd is writing is read as it grows, through to its end
// after the commit, from the ingest layout of real containerd 1.6 and 2.x.
func TestInFlight(t *testing.T) {
	for _, v := range containerdBinaries() {
		t.Run(v.name, func(t *testing.T) { testInFlight(t, v.bin) })
	}
}

func testInFlight(t *testing.T, bin string) {
	ctd := startContainerd(t, bin)
	cl := ctd.Client(t, "k8s.io")
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	blob := make([]byte, 3<<20)
	rand.Read(blob)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
	fl := NewInFlight(ctd.ContentDir, 2*time.Second)

	if _, err := fl.Open(ctx, desc.Digest, 0, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("before the pull: err %v, want ErrNotFound", err)
	}
	// Asked to wait, it finds the ingest once the pull starts.
	opened := make(chan *Growing, 1)
	go func() {
		g, err := fl.Open(ctx, desc.Digest, 1000, 3*time.Second)
		if err != nil {
			t.Error(err)
		}
		opened <- g
	}()
	time.Sleep(100 * time.Millisecond)

	// The ref a pull uses (remotes.MakeRefKey): "layer-" and the digest.
	w, err := content.OpenWriter(ctx, cl.ContentStore(), content.WithRef("layer-"+desc.Digest.String()), content.WithDescriptor(desc))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(blob[:1<<20]); err != nil {
		t.Fatal(err)
	}
	g := <-opened
	if g == nil {
		t.FailNow()
	}
	defer g.Close()
	if g.Size() != desc.Size {
		t.Errorf("size %d, want %d", g.Size(), desc.Size)
	}
	got := make(chan []byte, 1)
	go func() {
		b, err := io.ReadAll(g)
		if err != nil {
			t.Errorf("reading the growing blob: %v", err)
		}
		got <- b
	}()
	// The rest arrives slowly, then containerd commits it.
	for off := 1 << 20; off < len(blob); off += 512 << 10 {
		time.Sleep(50 * time.Millisecond)
		if _, err := w.Write(blob[off:min(off+512<<10, len(blob))]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if b := <-got; !bytes.Equal(b, blob[1000:]) {
		t.Fatalf("read %d bytes that differ from the blob from offset 1000", len(b))
	}

	// Committed but in no image yet: still served, whole.
	g2, err := fl.Open(ctx, desc.Digest, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(g2)
	g2.Close()
	if !bytes.Equal(b, blob) {
		t.Fatal("the committed blob read back wrong")
	}
}

// A writer that stops makes the reader fail after the stall timeout, and
// one that is abandoned makes it fail sooner; neither waits forever.
func TestInFlightStalls(t *testing.T) {
	ctd := startContainerd(t, containerdBinaries()[0].bin)
	cl := ctd.Client(t, "k8s.io")
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")
	desc := ocispec.Descriptor{Digest: digest.FromString("never finished"), Size: 1 << 20}
	w, err := content.OpenWriter(ctx, cl.ContentStore(), content.WithRef("layer-"+desc.Digest.String()), content.WithDescriptor(desc))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.Write(make([]byte, 1000))
	fl := NewInFlight(ctd.ContentDir, 300*time.Millisecond)
	g, err := fl.Open(ctx, desc.Digest, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(g)
	g.Close()
	if err == nil || len(b) != 1000 {
		t.Fatalf("stalled writer: read %d bytes, err %v; want 1000 and an error", len(b), err)
	}

	g, err = fl.Open(ctx, desc.Digest, 1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cl.ContentStore().Abort(tctx, "layer-"+desc.Digest.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Read(make([]byte, 10)); err == nil {
		t.Fatal("an abandoned ingest read without error")
	}
}
