package web

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

const (
	// measureTimeout bounds a whole measurement.
	measureTimeout = 5 * time.Minute
	// lookupWindow is how long the lookup collects peers after it starts.
	lookupWindow = 2 * time.Second
	// lookupPeers is how many peers the lookup lists at most.
	lookupPeers = 10
)

// Measurement is the result of Measure Image Pull.
type Measurement struct {
	Image  string       `json:"image"`
	Lookup LookupResult `json:"lookup"`
	Pull   PullResult   `json:"pull"`
}

// LookupResult says which peers hold the image.
type LookupResult struct {
	Key string `json:"key"`
	// Local says this node holds the key itself (lookups never return it).
	Local bool     `json:"local"`
	Peers []string `json:"peers"`
	// Latency is the time to the first peer; empty when none answered.
	Latency        string  `json:"latency"`
	LatencySeconds float64 `json:"latencySeconds"`
	Duration       string  `json:"duration"`
	Error          string  `json:"error,omitempty"`
}

// PullResult is the pull through the node's mirror.
type PullResult struct {
	Digest          string  `json:"digest"`
	Platform        string  `json:"platform"`
	Duration        string  `json:"duration"`
	DurationSeconds float64 `json:"durationSeconds"`
	Size            int64   `json:"size"`
	SizeText        string  `json:"sizeText"`
	Throughput      string  `json:"throughput"`
	Blobs           []Fetch `json:"blobs"`
	// Error says where the pull stopped; the rows before it still show.
	Error string `json:"error,omitempty"`
}

// Fetch is one request of the pull: a manifest, the config or a layer.
type Fetch struct {
	Kind            string   `json:"kind"` // index, manifest, config, layer
	Digest          string   `json:"digest"`
	MediaType       string   `json:"mediaType"`
	Size            int64    `json:"size"`
	SizeText        string   `json:"sizeText"`
	Duration        string   `json:"duration"`
	DurationSeconds float64  `json:"durationSeconds"`
	Throughput      string   `json:"throughput"`
	Source          string   `json:"source"` // local or peer
	Peers           []string `json:"peers"`
}

// imageKey is what img is advertised under: its digest, or its tag key.
func imageKey(img oci.Image) string {
	if img.Digest != "" {
		return img.Digest.String()
	}
	return img.TagKey()
}

// Measure looks ref up on the router and pulls it through the node's own
// registry the way containerd does (HEAD the manifest by tag, GET it by
// digest, pick this node's platform from an index, GET the config and every
// layer), verifying and discarding the bytes. Nothing reaches containerd.
// Only a reference that cannot be parsed is an error; how far the pull got
// is in the result.
func (w *Web) Measure(ctx context.Context, image string) (Measurement, error) {
	img, err := oci.ParseReference(image)
	if err != nil {
		return Measurement{}, fmt.Errorf("%v; want e.g. docker.io/library/nginx:1.27 or registry:5000/app@sha256:...", err)
	}
	ref := img.Registry + "/" + img.Repository
	if img.Digest != "" {
		ref += "@" + img.Digest.String()
	} else {
		ref += ":" + img.Tag
	}
	m := Measurement{Image: ref, Lookup: w.lookup(ctx, imageKey(img))}
	m.Pull = w.pull(ctx, img)
	return m, nil
}

func (w *Web) lookup(ctx context.Context, key string) LookupResult {
	res := LookupResult{Key: key, Peers: []string{}, Local: slices.Contains(w.store.Keys(), key)}
	ctx, cancel := context.WithTimeout(ctx, lookupWindow)
	defer cancel()
	start := time.Now()
	ch, err := w.router.Lookup(ctx, key, lookupPeers)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	for p := range ch {
		if len(res.Peers) == 0 {
			d := time.Since(start)
			res.Latency, res.LatencySeconds = roundDuration(d).String(), d.Seconds()
		}
		res.Peers = append(res.Peers, p.String())
	}
	res.Duration = roundDuration(time.Since(start)).String()
	return res
}

func (w *Web) pull(ctx context.Context, img oci.Image) (res PullResult) {
	res = PullResult{Blobs: []Fetch{}, Platform: runtime.GOOS + "/" + runtime.GOARCH}
	start := time.Now()
	defer func() { res.total(time.Since(start)) }()
	dgst, err := w.resolve(ctx, img)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	res.Digest = dgst.String()
	man, err := w.imageManifest(ctx, img, dgst, &res)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	if man.Config.Digest == "" {
		res.Error = "manifest has no config: not an image manifest"
		return res
	}
	for i, desc := range append([]ocispec.Descriptor{man.Config}, man.Layers...) {
		kind := "layer"
		if i == 0 {
			kind = "config"
		}
		f, err := w.blob(ctx, img, kind, desc)
		res.Blobs = append(res.Blobs, f)
		if err != nil {
			res.Error = fmt.Sprintf("%s %s: %v", kind, desc.Digest, err)
			return res
		}
	}
	return res
}

// total sums up the pull's requests once it is over, d after it began.
func (res *PullResult) total(d time.Duration) {
	res.Duration, res.DurationSeconds = roundDuration(d).String(), d.Seconds()
	for _, b := range res.Blobs {
		res.Size += b.Size
	}
	res.SizeText = formatBytes(res.Size)
	res.Throughput = throughput(res.Size, d)
}

// resolve returns the manifest digest img names: its own, or what the
// mirror answers a HEAD by tag with.
func (w *Web) resolve(ctx context.Context, img oci.Image) (digest.Digest, error) {
	if img.Digest != "" {
		return img.Digest, nil
	}
	resp, err := w.request(ctx, http.MethodHead, img, peerproto.Manifests, img.Tag)
	if err != nil {
		return "", fmt.Errorf("resolving tag %s: %v", img.Tag, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("resolving tag %s: the mirror answered %s: %s", img.Tag, resp.Status, missHint)
	}
	dgst, err := oci.ParseDigest(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return "", fmt.Errorf("resolving tag %s: %v", img.Tag, err)
	}
	return dgst, nil
}

// imageDoc is the part of a manifest or index the pull reads.
type imageDoc struct {
	MediaType string               `json:"mediaType"`
	Manifests []ocispec.Descriptor `json:"manifests"`
	Config    ocispec.Descriptor   `json:"config"`
	Layers    []ocispec.Descriptor `json:"layers"`
}

// imageManifest fetches the manifest dgst names and, when it is an index,
// the manifest in it for this node's platform, recording each request in
// res.
func (w *Web) imageManifest(ctx context.Context, img oci.Image, dgst digest.Digest, res *PullResult) (imageDoc, error) {
	var man imageDoc
	if err := w.manifestDoc(ctx, img, dgst, res, &man); err != nil {
		return man, err
	}
	if len(man.Manifests) == 0 {
		return man, nil
	}
	res.Blobs[len(res.Blobs)-1].Kind = "index"
	desc, err := pickPlatform(man.Manifests, runtime.GOOS, runtime.GOARCH)
	if err != nil {
		return man, fmt.Errorf("index %s: %v", dgst, err)
	}
	man.Config, man.Layers = ocispec.Descriptor{}, nil
	return man, w.manifestDoc(ctx, img, desc.Digest, res, &man)
}

// manifestDoc fetches a manifest into man, recording the request in res.
func (w *Web) manifestDoc(ctx context.Context, img oci.Image, dgst digest.Digest, res *PullResult, man *imageDoc) error {
	body, f, err := w.manifest(ctx, img, dgst)
	if f.Digest != "" {
		res.Blobs = append(res.Blobs, f)
	}
	if err != nil {
		return fmt.Errorf("manifest %s: %v", dgst, err)
	}
	if err := json.Unmarshal(body, man); err != nil {
		return fmt.Errorf("manifest %s is not JSON: %v", dgst, err)
	}
	return nil
}

// missHint explains a 404 from the mirror.
const missHint = "no node of this cluster holds it (containerd would pull it from the upstream registry)"

// manifest GETs a manifest by digest and verifies it.
func (w *Web) manifest(ctx context.Context, img oci.Image, dgst digest.Digest) ([]byte, Fetch, error) {
	f := Fetch{Kind: "manifest", Digest: dgst.String(), Peers: []string{}}
	start := time.Now()
	resp, err := w.request(ctx, http.MethodGet, img, peerproto.Manifests, dgst.String())
	if err != nil {
		return nil, Fetch{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, Fetch{}, fmt.Errorf("the mirror answered %s: %s", resp.Status, missHint)
	}
	body, err := peerproto.ReadManifest(resp.Body)
	f.finish(resp, int64(len(body)), time.Since(start))
	if err != nil {
		return nil, f, fmt.Errorf("reading: %w", err)
	}
	if err := peerproto.VerifyManifest(body, dgst, -1); err != nil {
		return nil, f, err
	}
	return body, f, nil
}

// blob GETs a blob, verifying and discarding it.
func (w *Web) blob(ctx context.Context, img oci.Image, kind string, desc ocispec.Descriptor) (Fetch, error) {
	f := Fetch{Kind: kind, Digest: desc.Digest.String(), MediaType: desc.MediaType, Peers: []string{}}
	start := time.Now()
	resp, err := w.request(ctx, http.MethodGet, img, peerproto.Blobs, desc.Digest.String())
	if err != nil {
		return f, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return f, fmt.Errorf("the mirror answered %s: %s", resp.Status, missHint)
	}
	v := desc.Digest.Verifier()
	n, err := io.Copy(v, resp.Body)
	f.finish(resp, n, time.Since(start))
	f.MediaType = desc.MediaType
	if err != nil {
		return f, fmt.Errorf("after %d bytes: %w", n, err)
	}
	if n != desc.Size || !v.Verified() {
		return f, fmt.Errorf("got %d bytes that do not match the digest (want %d bytes)", n, desc.Size)
	}
	return f, nil
}

func (f *Fetch) finish(resp *http.Response, n int64, d time.Duration) {
	if f.MediaType == "" {
		f.MediaType = resp.Header.Get("Content-Type")
	}
	f.Size, f.SizeText = n, formatBytes(n)
	f.Duration, f.DurationSeconds = roundDuration(d).String(), d.Seconds()
	f.Throughput = throughput(n, d)
	f.Source, f.Peers = peerproto.ParseSource(resp.Header.Get(peerproto.SourceHeader))
}

func (w *Web) request(ctx context.Context, method string, img oci.Image, segment, ref string) (*http.Response, error) {
	u := peerproto.URL(w.cfg.RegistryURL, img.Repository, segment, ref, img.Registry)
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, err
	}
	if segment == peerproto.Manifests {
		req.Header.Set("Accept", peerproto.ManifestAccept)
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reaching the node's registry at %s: %w", w.cfg.RegistryURL, err)
	}
	return resp, nil
}

// pickPlatform chooses the manifest for os/arch from an index, as
// containerd does for the node it runs on.
func pickPlatform(manifests []ocispec.Descriptor, goos, goarch string) (ocispec.Descriptor, error) {
	var have []string
	for _, d := range manifests {
		if d.Platform == nil {
			continue
		}
		if d.Platform.OS == goos && d.Platform.Architecture == goarch {
			return d, nil
		}
		have = append(have, d.Platform.OS+"/"+d.Platform.Architecture)
	}
	return ocispec.Descriptor{}, fmt.Errorf("no manifest for %s/%s (the index has %s)", goos, goarch, strings.Join(have, ", "))
}

func throughput(n int64, d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return formatBytes(int64(float64(n)/d.Seconds())) + "/s"
}

// roundDuration keeps three significant figures or so: 1.23ms, 2.5s.
func roundDuration(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	default:
		return d.Round(time.Microsecond)
	}
}
