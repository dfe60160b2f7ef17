package registry

import (
	"context"
	"crypto/rand"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/store"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

// fileBlob writes a random blob to a file, as containerd's content store
// holds it, and returns its path and digest.
func fileBlob(b *testing.B, size int) (string, digest.Digest) {
	b.Helper()
	path := filepath.Join(b.TempDir(), "blob")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	h := digest.SHA256.Digester()
	if _, err := io.CopyN(io.MultiWriter(f, h.Hash()), rand.Reader, int64(size)); err != nil {
		b.Fatal(err)
	}
	return path, h.Digest()
}

// fileStore serves one blob from a file, so serving uses sendfile as the
// containerd store does with its content directory mounted.
type fileStore struct {
	*storetest.Memory
	path string
	d    digest.Digest
	size int64
}

func (s *fileStore) Descriptor(_ context.Context, d digest.Digest) (ocispec.Descriptor, error) {
	if d != s.d {
		return ocispec.Descriptor{}, store.ErrNotFound
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: d, Size: s.size}, nil
}

func (s *fileStore) Open(_ context.Context, d digest.Digest) (io.ReadSeekCloser, error) {
	if d != s.d {
		return nil, store.ErrNotFound
	}
	return os.Open(s.path)
}

const benchBlobSize = 256 << 20

// BenchmarkReadFile is the limit on this machine: reading the blob file.
func BenchmarkReadFile(b *testing.B) {
	path, _ := fileBlob(b, benchBlobSize)
	b.SetBytes(benchBlobSize)
	for b.Loop() {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, f)
		f.Close()
	}
}

// BenchmarkServeLocal serves the blob from the store over HTTP on loopback.
func BenchmarkServeLocal(b *testing.B) {
	path, d := fileBlob(b, benchBlobSize)
	fs := &fileStore{Memory: storetest.NewMemory(), path: path, d: d, size: benchBlobSize}
	nodes := newNodes(b, 1, func(int, http.Handler) http.Handler { return mustRegistry(b, fs) })
	benchGet(b, nodes[0].srv.URL+"/v2/app/blobs/"+d.String())
}

// BenchmarkServeFromPeer fetches the blob through node 0 from node 1:
// streamed, hashed on the way, the end held back until it verifies.
func BenchmarkServeFromPeer(b *testing.B) {
	path, d := fileBlob(b, benchBlobSize)
	fs := &fileStore{Memory: storetest.NewMemory(), path: path, d: d, size: benchBlobSize}
	nodes := newNodes(b, 2, func(i int, h http.Handler) http.Handler {
		if i == 1 {
			return mustRegistry(b, fs)
		}
		return h
	})
	if err := nodes[1].router.Advertise(context.Background(), []string{d.String()}); err != nil {
		b.Fatal(err)
	}
	benchGet(b, nodes[0].srv.URL+"/v2/app/blobs/"+d.String())
}

func benchGet(b *testing.B, url string) {
	b.SetBytes(benchBlobSize)
	for b.Loop() {
		resp, err := http.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || n != benchBlobSize {
			b.Fatalf("status %d, %d bytes", resp.StatusCode, n)
		}
	}
}

func mustRegistry(b *testing.B, st *fileStore) http.Handler {
	r, err := New(st)
	if err != nil {
		b.Fatal(err)
	}
	return r
}
