package canary

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Registry is the canary image's registry name. It is under .invalid
// (RFC 2606), which no resolver answers, so no upstream could ever serve
// it, or be asked for it: containerd reaches it only through the hosts.toml
// the agent writes, and when it does not read that file the pull fails.
const Registry = "canary.fleetmirror.invalid"

// Repository is the canary image's repository under Registry.
const Repository = "fleetmirror/canary"

// blob is one piece of the canary image.
type blob struct {
	mediaType string
	digest    digest.Digest
	data      []byte
}

func newBlob(mediaType string, data []byte) blob {
	return blob{mediaType: mediaType, digest: digest.FromBytes(data), data: data}
}

func (b blob) descriptor() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: b.mediaType, Digest: b.digest, Size: int64(len(b.data))}
}

// image is one run's canary: a manifest, a config and one layer holding
// the run's nonce, so no node has any of it before the pull.
type image struct {
	tag                     string
	manifest, config, layer blob
}

// newImage builds the canary for nonce, an image for this node's platform
// so that CRI unpacks it as it would a workload's.
func newImage(nonce string) (*image, error) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	content := []byte("fleetmirror canary " + nonce + "\n")
	if err := tw.WriteHeader(&tar.Header{Name: "fleetmirror-canary", Mode: 0o644, Size: int64(len(content)),
		ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(content); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	// An uncompressed layer: its digest is its diff ID.
	layer := newBlob(ocispec.MediaTypeImageLayer, tb.Bytes())
	cfg, err := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer.digest}},
	})
	if err != nil {
		return nil, err
	}
	config := newBlob(ocispec.MediaTypeImageConfig, cfg)
	man, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    config.descriptor(),
		Layers:    []ocispec.Descriptor{layer.descriptor()},
	})
	if err != nil {
		return nil, err
	}
	return &image{tag: nonce, manifest: newBlob(ocispec.MediaTypeImageManifest, man), config: config, layer: layer}, nil
}

// ref is the image reference CRI pulls.
func (im *image) ref() string { return Registry + "/" + Repository + ":" + im.tag }

func (im *image) blobs() []blob { return []blob{im.manifest, im.config, im.layer} }

// served counts what containerd asked of one run's image.
type served struct {
	im *image

	mu                      sync.Mutex
	manifest, config, layer int
	requests                int
	bytes                   int64
}

func (s *served) counts() (manifest, config, layer, requests int, bytes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.manifest, s.config, s.layer, s.requests, s.bytes
}

// serve answers a distribution API request for the canary repository:
// the run's manifest by tag or digest, its blobs by digest, 404 otherwise.
func (s *served) serve(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "the canary is read-only", http.StatusMethodNotAllowed)
		return
	}
	rest, ok := strings.CutPrefix(req.URL.Path, "/v2/"+Repository+"/")
	kind, ref, _ := strings.Cut(rest, "/")
	var b *blob
	if s != nil && ok {
		im := s.im
		switch {
		case kind == "manifests" && (ref == im.tag || ref == im.manifest.digest.String()):
			b = &im.manifest
		case kind == "blobs" && ref == im.config.digest.String():
			b = &im.config
		case kind == "blobs" && ref == im.layer.digest.String():
			b = &im.layer
		}
	}
	if b == nil {
		// Another run's image, or none running: nothing to pull.
		http.Error(w, "not this agent's current canary", http.StatusNotFound)
		return
	}
	s.mu.Lock()
	s.requests++
	switch b.digest {
	case s.im.manifest.digest:
		s.manifest++
	case s.im.config.digest:
		s.config++
	default:
		s.layer++
	}
	if req.Method == http.MethodGet {
		s.bytes += int64(len(b.data))
	}
	s.mu.Unlock()
	w.Header().Set("Content-Type", b.mediaType)
	w.Header().Set("Docker-Content-Digest", b.digest.String())
	w.Header().Set("Content-Length", strconv.Itoa(len(b.data)))
	if req.Method == http.MethodGet {
		w.Write(b.data)
	}
}
