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

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/registry"
)

const (
	// measureTimeout bounds a whole measurement.
	measureTimeout = 5 * time.Minute
	// lookupWindow is how long the lookup collects peers after it starts.
	lookupWindow = 2 * time.Second
	// lookupPeers is how many peers the lookup lists at most.
	lookupPeers = 10
	// maxManifest bounds manifests read into memory, as registries do.
	maxManifest = 4 << 20
)

// Media types of manifests, as containerd asks for them.
var manifestTypes = []string{
	ocispec.MediaTypeImageIndex,
	ocispec.MediaTypeImageManifest,
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

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

// target is an image reference split the way containerd asks the mirror.
type target struct {
	registry, repository, tag string
	digest                    digest.Digest
}

func parseTarget(image string) (target, error) {
	named, err := reference.ParseDockerRef(strings.TrimSpace(image))
	if err != nil {
		return target{}, fmt.Errorf("image reference %q: %v; want e.g. docker.io/library/nginx:1.27 or registry:5000/app@sha256:...", image, err)
	}
	t := target{registry: reference.Domain(named), repository: reference.Path(named)}
	if d, ok := named.(reference.Digested); ok {
		t.digest = d.Digest()
	} else if tg, ok := named.(reference.Tagged); ok {
		t.tag = tg.Tag()
	}
	return t, nil
}

func (t target) key() string {
	if t.digest != "" {
		return t.digest.String()
	}
	return oci.TagKey(t.registry, t.repository, t.tag)
}

// Measure looks ref up on the router and pulls it through the node's own
// registry the way containerd does (HEAD the manifest by tag, GET it by
// digest, pick this node's platform from an index, GET the config and every
// layer), verifying and discarding the bytes. Nothing reaches containerd.
// Only a reference that cannot be parsed is an error; how far the pull got
// is in the result.
func (w *Web) Measure(ctx context.Context, image string) (Measurement, error) {
	t, err := parseTarget(image)
	if err != nil {
		return Measurement{}, err
	}
	ref := t.registry + "/" + t.repository
	if t.digest != "" {
		ref += "@" + t.digest.String()
	} else {
		ref += ":" + t.tag
	}
	m := Measurement{Image: ref, Lookup: w.lookup(ctx, t.key())}
	m.Pull = w.pull(ctx, t)
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

func (w *Web) pull(ctx context.Context, t target) (res PullResult) {
	res = PullResult{Blobs: []Fetch{}, Platform: runtime.GOOS + "/" + runtime.GOARCH}
	start := time.Now()
	defer func() {
		d := time.Since(start)
		res.Duration, res.DurationSeconds = roundDuration(d).String(), d.Seconds()
		for _, b := range res.Blobs {
			res.Size += b.Size
		}
		res.SizeText = formatBytes(res.Size)
		res.Throughput = throughput(res.Size, d)
	}()
	fail := func(format string, args ...any) PullResult {
		res.Error = fmt.Sprintf(format, args...)
		return res
	}

	dgst := t.digest
	if dgst == "" {
		resp, err := w.request(ctx, http.MethodHead, t, "manifests", t.tag)
		if err != nil {
			return fail("resolving tag %s: %v", t.tag, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fail("resolving tag %s: the mirror answered %s: %s", t.tag, resp.Status, missHint)
		}
		if dgst, err = oci.ParseDigest(resp.Header.Get("Docker-Content-Digest")); err != nil {
			return fail("resolving tag %s: %v", t.tag, err)
		}
	}
	res.Digest = dgst.String()

	body, f, err := w.manifest(ctx, t, dgst)
	if f.Digest != "" {
		res.Blobs = append(res.Blobs, f)
	}
	if err != nil {
		return fail("manifest %s: %v", dgst, err)
	}
	var man struct {
		MediaType string               `json:"mediaType"`
		Manifests []ocispec.Descriptor `json:"manifests"`
		Config    ocispec.Descriptor   `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
	}
	if err := json.Unmarshal(body, &man); err != nil {
		return fail("manifest %s is not JSON: %v", dgst, err)
	}
	if len(man.Manifests) > 0 {
		res.Blobs[len(res.Blobs)-1].Kind = "index"
		desc, err := pickPlatform(man.Manifests, runtime.GOOS, runtime.GOARCH)
		if err != nil {
			return fail("index %s: %v", dgst, err)
		}
		body, f, err = w.manifest(ctx, t, desc.Digest)
		if f.Digest != "" {
			res.Blobs = append(res.Blobs, f)
		}
		if err != nil {
			return fail("manifest %s: %v", desc.Digest, err)
		}
		man.Config, man.Layers = ocispec.Descriptor{}, nil
		if err := json.Unmarshal(body, &man); err != nil {
			return fail("manifest %s is not JSON: %v", desc.Digest, err)
		}
	}
	if man.Config.Digest == "" {
		return fail("manifest has no config: not an image manifest")
	}
	blobs := append([]ocispec.Descriptor{man.Config}, man.Layers...)
	for i, desc := range blobs {
		kind := "layer"
		if i == 0 {
			kind = "config"
		}
		f, err := w.blob(ctx, t, kind, desc)
		res.Blobs = append(res.Blobs, f)
		if err != nil {
			return fail("%s %s: %v", kind, desc.Digest, err)
		}
	}
	return res
}

// missHint explains a 404 from the mirror.
const missHint = "no node of this cluster holds it (containerd would pull it from the upstream registry)"

// manifest GETs a manifest by digest and verifies it.
func (w *Web) manifest(ctx context.Context, t target, dgst digest.Digest) ([]byte, Fetch, error) {
	f := Fetch{Kind: "manifest", Digest: dgst.String(), Peers: []string{}}
	start := time.Now()
	resp, err := w.request(ctx, http.MethodGet, t, "manifests", dgst.String())
	if err != nil {
		return nil, Fetch{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, Fetch{}, fmt.Errorf("the mirror answered %s: %s", resp.Status, missHint)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifest+1))
	f.finish(resp, int64(len(body)), time.Since(start))
	if err != nil {
		return nil, f, fmt.Errorf("reading: %w", err)
	}
	if digest.FromBytes(body) != dgst {
		return nil, f, fmt.Errorf("body does not match its digest")
	}
	return body, f, nil
}

// blob GETs a blob, verifying and discarding it.
func (w *Web) blob(ctx context.Context, t target, kind string, desc ocispec.Descriptor) (Fetch, error) {
	f := Fetch{Kind: kind, Digest: desc.Digest.String(), MediaType: desc.MediaType, Peers: []string{}}
	start := time.Now()
	resp, err := w.request(ctx, http.MethodGet, t, "blobs", desc.Digest.String())
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
	f.Source, f.Peers = parseSource(resp.Header.Get(registry.SourceHeader))
}

// parseSource reads registry.SourceHeader: "local", "peer" or "peer a,b".
func parseSource(h string) (string, []string) {
	src, peers, _ := strings.Cut(h, " ")
	if src == "" {
		src = "unknown"
	}
	out := []string{}
	for _, p := range strings.Split(peers, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return src, out
}

func (w *Web) request(ctx context.Context, method string, t target, kind, ref string) (*http.Response, error) {
	u := strings.TrimSuffix(w.cfg.RegistryURL, "/") + "/v2/" + t.repository + "/" + kind + "/" + ref + "?ns=" + t.registry
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, err
	}
	if kind == "manifests" {
		req.Header.Set("Accept", strings.Join(manifestTypes, ", "))
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
