package cluster

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// Blob is one content-addressed piece of a generated image.
type Blob struct {
	Digest    digest.Digest
	Size      int64
	MediaType string
}

// GeneratedImage is an image from GenerateImage with the digests tests
// assert on.
type GeneratedImage struct {
	Image    v1.Image
	Manifest Blob
	Config   Blob
	Layers   []Blob
}

// Blobs returns manifest, config and layers: everything a pull puts into
// containerd's content store.
func (g *GeneratedImage) Blobs() []Blob {
	return append([]Blob{g.Manifest, g.Config}, g.Layers...)
}

// Digests returns the digests of Blobs, for Node.VerifyContent.
func (g *GeneratedImage) Digests() []digest.Digest {
	var ds []digest.Digest
	for _, b := range g.Blobs() {
		ds = append(ds, b.Digest)
	}
	return ds
}

// LayerDigests returns only the layer digests.
func (g *GeneratedImage) LayerDigests() []digest.Digest {
	var ds []digest.Digest
	for _, b := range g.Layers {
		ds = append(ds, b.Digest)
	}
	return ds
}

// Image returns a deterministic image of about size bytes of random
// (incompressible) content split over layers uncompressed tar layers: the same
// seed, size and layers always give the same digests.
func Image(seed int64, size int64, layers int) (v1.Image, error) {
	g, err := GenerateImage(seed, size, layers)
	if err != nil {
		return nil, err
	}
	return g.Image, nil
}

// GenerateImage is Image plus the digests and sizes of all its blobs. Layer
// bytes are regenerated from the seed whenever they are read, so even large
// images cost no memory.
func GenerateImage(seed int64, size int64, layers int) (*GeneratedImage, error) {
	if layers < 1 || size < int64(layers) {
		return nil, fmt.Errorf("image: need layers >= 1 and size >= layers, got size %d layers %d", size, layers)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	// Pulls resolve platforms; match the machine so any containerd accepts it.
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Config.Labels = map[string]string{"fleetmirror.test/seed": fmt.Sprint(seed)}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return nil, err
	}
	var ls []v1.Layer
	per := size / int64(layers)
	for i := range layers {
		n := per
		if i == layers-1 {
			n = size - per*int64(layers-1)
		}
		l, err := newRandomLayer(seed, i, n)
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
	}
	if img, err = mutate.AppendLayers(img, ls...); err != nil {
		return nil, err
	}
	g := &GeneratedImage{Image: img}
	desc := func(h v1.Hash, size int64, mt types.MediaType) Blob {
		return Blob{Digest: digest.Digest(h.String()), Size: size, MediaType: string(mt)}
	}
	mh, err := img.Digest()
	if err != nil {
		return nil, err
	}
	ms, err := img.Size()
	if err != nil {
		return nil, err
	}
	g.Manifest = desc(mh, ms, types.OCIManifestSchema1)
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	g.Config = desc(m.Config.Digest, m.Config.Size, m.Config.MediaType)
	for _, l := range m.Layers {
		g.Layers = append(g.Layers, desc(l.Digest, l.Size, l.MediaType))
	}
	return g, nil
}

// randomLayer is an uncompressed tar holding one file of ChaCha8 bytes.
// Uncompressed because gzip of random data only burns CPU.
type randomLayer struct {
	seed  int64
	index int
	n     int64

	once sync.Once
	hash v1.Hash
	size int64
	err  error
}

func newRandomLayer(seed int64, index int, n int64) (*randomLayer, error) {
	l := &randomLayer{seed: seed, index: index, n: n}
	if _, err := l.Digest(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *randomLayer) open() io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		var key [32]byte
		binary.LittleEndian.PutUint64(key[0:], uint64(l.seed))
		binary.LittleEndian.PutUint64(key[8:], uint64(l.index))
		src := io.LimitReader(rand.NewChaCha8(key), l.n)
		tw := tar.NewWriter(pw)
		err := tw.WriteHeader(&tar.Header{
			Name:     fmt.Sprintf("fleetmirror/%d-%d.bin", l.seed, l.index),
			Mode:     0o644,
			Size:     l.n,
			Typeflag: tar.TypeReg,
			Format:   tar.FormatPAX,
		})
		if err == nil {
			_, err = io.Copy(tw, src)
		}
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	return pr
}

func (l *randomLayer) Digest() (v1.Hash, error) {
	l.once.Do(func() {
		r := l.open()
		defer r.Close()
		h := sha256.New()
		l.size, l.err = io.Copy(h, r)
		if l.err == nil {
			l.hash, l.err = v1.NewHash(fmt.Sprintf("sha256:%x", h.Sum(nil)))
		}
	})
	return l.hash, l.err
}

func (l *randomLayer) DiffID() (v1.Hash, error)             { return l.Digest() }
func (l *randomLayer) Compressed() (io.ReadCloser, error)   { return l.open(), nil }
func (l *randomLayer) Uncompressed() (io.ReadCloser, error) { return l.open(), nil }
func (l *randomLayer) MediaType() (types.MediaType, error)  { return types.OCIUncompressedLayer, nil }
func (l *randomLayer) Size() (int64, error) {
	if _, err := l.Digest(); err != nil {
		return 0, err
	}
	return l.size, nil
}
