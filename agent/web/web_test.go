package web

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/fetch"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/registry"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

// peersRouter adds a fixed peer list to a memory router.
type peersRouter struct {
	*routing.Memory
	peers []routing.Peer
}

func (r peersRouter) Peers() []routing.Peer { return r.peers }

// node is an agent's registry on loopback with its debug page.
type node struct {
	store   *storetest.Memory
	metrics *metrics.Metrics
	router  peersRouter
	addr    netip.AddrPort
	web     *Web
	page    *httptest.Server
}

func newNodes(t *testing.T, n int) []*node {
	t.Helper()
	lns := make([]net.Listener, n)
	addrs := make([]netip.AddrPort, n)
	for i := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[i], addrs[i] = ln, netip.MustParseAddrPort(ln.Addr().String())
	}
	routers := routing.NewMemory(addrs...)
	nodes := make([]*node, n)
	for i := range nodes {
		nd := &node{store: storetest.NewMemory(), metrics: metrics.New(func() int { return 0 }), addr: addrs[i],
			router: peersRouter{Memory: routers[i]}}
		mir, err := fetch.New(routers[i], fetch.WithMetrics(nd.metrics),
			fetch.WithResolveTimeout(200*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		reg, err := registry.New(nd.store, registry.WithFetcher(mir), registry.WithMetrics(nd.metrics))
		if err != nil {
			t.Fatal(err)
		}
		srv := &httptest.Server{Listener: lns[i], Config: &http.Server{Handler: reg}}
		srv.Start()
		t.Cleanup(srv.Close)
		for j, a := range addrs {
			if j != i {
				nd.router.peers = append(nd.router.peers, routing.Peer{ID: fmt.Sprintf("peer-%d", j), Address: a.String()})
			}
		}
		nd.web, err = New(nd.router, nd.store, nd.metrics.Registry,
			Config{RegistryURL: srv.URL, MirroredRegistries: []string{"example.com"}, ResolveTimeout: 20 * time.Millisecond,
				ResolveRetries: 3, Version: "v-test"})
		if err != nil {
			t.Fatal(err)
		}
		nd.page = httptest.NewServer(nd.web.Handler())
		t.Cleanup(nd.page.Close)
		nodes[i] = nd
	}
	return nodes
}

func (nd *node) hold(t *testing.T, mediaType string, b []byte, tagKeys ...string) ocispec.Descriptor {
	t.Helper()
	d := nd.store.Add(mediaType, b, tagKeys...)
	keys := append([]string{d.String()}, tagKeys...)
	if err := nd.router.Advertise(context.Background(), keys); err != nil {
		t.Fatal(err)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(b))}
}

// holdImage puts a multi-platform image (index, manifest, config, layers)
// in the node's store under tagKey.
func (nd *node) holdImage(t *testing.T, tagKey string, layerSizes ...int) (layers []ocispec.Descriptor) {
	t.Helper()
	config := nd.hold(t, ocispec.MediaTypeImageConfig, []byte(`{"architecture":"`+runtime.GOARCH+`","os":"`+runtime.GOOS+`"}`))
	for _, n := range layerSizes {
		b := make([]byte, n)
		rand.Read(b)
		layers = append(layers, nd.hold(t, ocispec.MediaTypeImageLayer, b))
	}
	man, _ := json.Marshal(ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: config, Layers: layers})
	md := nd.hold(t, ocispec.MediaTypeImageManifest, man)
	md.Platform = &ocispec.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	other := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("other"), Size: 10,
		Platform: &ocispec.Platform{OS: "windows", Architecture: "s390x"}}
	idx, _ := json.Marshal(ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{other, md}})
	nd.hold(t, ocispec.MediaTypeImageIndex, idx, tagKey)
	return layers
}

func TestStatsWithoutPeers(t *testing.T) {
	nd := newNodes(t, 1)[0]
	s := nd.web.Stats(context.Background())
	if s.LastMirrorSuccess != Pending || s.LastMirrorSuccessAt != nil {
		t.Errorf("last mirror success = %q, want %q before the first", s.LastMirrorSuccess, Pending)
	}
	if len(s.Peers) != 0 || s.Requests.PeerHitRatio != -1 || s.Prep.Configured || s.Prep.Detail != "not configured" {
		t.Errorf("fresh node stats: %+v", s)
	}
	resp, err := http.Get(nd.page.URL + "/debug/web/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"Pending", "No peers connected", "not configured", "example.com", "20ms", "v-test", "Measure Image Pull", "Mirror path", "--canary-interval=0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(string(body), "http://") && strings.Contains(string(body), "src=\"http") {
		t.Error("page loads an external script")
	}
}

func TestStatsFromMetrics(t *testing.T) {
	nd := newNodes(t, 2)[0]
	nd.holdImage(t, "example.com/team/app:v1", 10)
	nd.store.Tag("other.io/x:v1", digest.FromString("x")) // not mirrored: not advertised
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	nd.web.now = func() time.Time { return now }
	nd.web.prep = func() (bool, string) { return false, "config_path is not set in /etc/containerd/config.toml" }
	nd.web.canary = func() (string, string) { return "failed", "step content: discard_unpacked_layers = true" }
	nd.metrics.LastSuccess.Set(float64(now.Add(-150 * time.Second).Unix()))
	nd.metrics.Requests.WithLabelValues("example.com", "blob", metrics.OutcomePeer).Add(3)
	nd.metrics.Requests.WithLabelValues("example.com", "manifest", metrics.OutcomePeer).Add(1)
	nd.metrics.Requests.WithLabelValues("example.com", "blob", metrics.OutcomeMiss).Add(4)
	nd.metrics.Requests.WithLabelValues("example.com", "blob", metrics.OutcomeLocal).Add(7)
	nd.metrics.ServedBytes.WithLabelValues(metrics.OutcomePeer).Add(5e6)
	nd.metrics.ServedToPeers.Add(1234)

	resp, err := http.Get(nd.page.URL + "/debug/web/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s Stats
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	if s.LastMirrorSuccess != "2m30s" {
		t.Errorf("last mirror success = %q, want 2m30s", s.LastMirrorSuccess)
	}
	if s.Requests.Peer != 4 || s.Requests.Miss != 4 || s.Requests.Local != 7 || s.Requests.PeerHitRatio != 0.5 {
		t.Errorf("requests = %+v", s.Requests)
	}
	if s.Bytes.FromPeers != 5e6 || s.Bytes.UpstreamSaved != 5e6 || s.Bytes.ServedToPeers != 1234 {
		t.Errorf("bytes = %+v", s.Bytes)
	}
	if s.Advertised.Images != 1 || s.Advertised.Tags != 1 || s.Advertised.Digests != 4 ||
		len(s.Advertised.TagKeys) != 1 || s.Advertised.TagKeys[0] != "example.com/team/app:v1" {
		t.Errorf("advertised = %+v", s.Advertised)
	}
	if len(s.Peers) != 1 || s.Peers[0].Address == "" {
		t.Errorf("peers = %+v", s.Peers)
	}
	if !s.Prep.Configured || s.Prep.OK || !strings.Contains(s.Prep.Detail, "config_path") {
		t.Errorf("prep = %+v", s.Prep)
	}
	if s.Canary.State != "failed" || !strings.Contains(s.Canary.Detail, "discard_unpacked_layers") {
		t.Errorf("canary = %+v", s.Canary)
	}
}

func TestAgo(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tt := range []struct {
		at   time.Time
		want string
	}{
		{now, "0s"},
		{now.Add(-150 * time.Second), "2m30s"},
		{now.Add(-3723 * time.Second), "1h2m3s"},
		{now.Add(time.Minute), "0s"}, // clock skew never shows a negative age
	} {
		if got := Ago(now, tt.at); got != tt.want {
			t.Errorf("Ago(%v) = %q, want %q", now.Sub(tt.at), got, tt.want)
		}
	}
}

func measure(t *testing.T, nd *node, image string) (int, Measurement, string) {
	t.Helper()
	resp, err := http.PostForm(nd.page.URL+"/debug/web/measure", url.Values{"image": {image}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var m Measurement
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &m); err != nil {
			t.Fatal(err)
		}
	}
	return resp.StatusCode, m, string(body)
}

func TestMeasureFromPeer(t *testing.T) {
	nodes := newNodes(t, 2)
	layers := nodes[1].holdImage(t, "example.com/team/app:v1", 300_000, 50_000)

	status, m, body := measure(t, nodes[0], "example.com/team/app:v1")
	if status != 200 {
		t.Fatalf("measure: %d %s", status, body)
	}
	if m.Pull.Error != "" {
		t.Fatalf("pull error: %s", m.Pull.Error)
	}
	if m.Lookup.Local || len(m.Lookup.Peers) != 1 || m.Lookup.Peers[0] != nodes[1].addr.String() || m.Lookup.Latency == "" {
		t.Errorf("lookup = %+v, want node 1 found", m.Lookup)
	}
	var kinds []string
	var layerRows int
	for _, b := range m.Pull.Blobs {
		kinds = append(kinds, b.Kind)
		if b.Source != "peer" {
			t.Errorf("%s %s came from %q, want peer", b.Kind, b.Digest, b.Source)
		}
		if b.Kind == "layer" || b.Kind == "config" {
			if len(b.Peers) != 1 || b.Peers[0] != nodes[1].addr.String() {
				t.Errorf("%s source peers = %v, want node 1", b.Kind, b.Peers)
			}
		}
		if b.Kind == "layer" {
			if b.Digest != layers[layerRows].Digest.String() || b.Size != layers[layerRows].Size {
				t.Errorf("layer row %d = %s/%d, want %s/%d", layerRows, b.Digest, b.Size, layers[layerRows].Digest, layers[layerRows].Size)
			}
			layerRows++
		}
	}
	if got := strings.Join(kinds, ","); got != "index,manifest,config,layer,layer" {
		t.Errorf("rows = %s", got)
	}
	if m.Pull.Size < 350_000 || m.Pull.Duration == "" || m.Pull.Platform != runtime.GOOS+"/"+runtime.GOARCH {
		t.Errorf("pull = %+v", m.Pull)
	}
	// Nothing was kept: the measuring node's store is untouched.
	if keys := nodes[0].store.Keys(); len(keys) != 0 {
		t.Errorf("measure stored %v", keys)
	}

	// On the node that holds it, everything is local.
	_, m, _ = measure(t, nodes[1], "example.com/team/app:v1")
	if !m.Lookup.Local || m.Pull.Error != "" {
		t.Fatalf("local measure: %+v", m)
	}
	for _, b := range m.Pull.Blobs {
		if b.Source != "local" {
			t.Errorf("%s came from %q on the node that holds it", b.Kind, b.Source)
		}
	}
}

func TestMeasureErrors(t *testing.T) {
	nodes := newNodes(t, 2)
	status, m, body := measure(t, nodes[0], "example.com/team/absent:v1")
	if status != 200 || !strings.Contains(m.Pull.Error, "no node of this cluster holds it") || len(m.Lookup.Peers) != 0 {
		t.Errorf("absent image: %d %s", status, body)
	}
	for _, bad := range []string{"", "example.com/Team/app:v1", "example.com/app:bad tag", strings.Repeat("a", 600)} {
		status, _, body := measure(t, nodes[0], bad)
		if status != 400 || !strings.Contains(body, "error") {
			t.Errorf("measure %q: %d %s, want 400 with an error", bad, status, body)
		}
	}
	resp, err := http.Get(nodes[0].page.URL + "/debug/web/measure")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET measure: %d, want 405", resp.StatusCode)
	}
}

func TestPickPlatform(t *testing.T) {
	ms := []ocispec.Descriptor{
		{Digest: "sha256:a", Platform: &ocispec.Platform{OS: "linux", Architecture: "arm64"}},
		{Digest: "sha256:b", Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64"}},
		{Digest: "sha256:c"},
	}
	if d, err := pickPlatform(ms, "linux", "amd64"); err != nil || d.Digest != "sha256:b" {
		t.Errorf("linux/amd64: %v %v", d.Digest, err)
	}
	if _, err := pickPlatform(ms, "linux", "riscv64"); err == nil || !strings.Contains(err.Error(), "linux/arm64, linux/amd64") {
		t.Errorf("missing platform: %v", err)
	}
}

func TestStaticAndRedirect(t *testing.T) {
	nd := newNodes(t, 1)[0]
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for path, want := range map[string]int{
		"/":                           http.StatusFound,
		"/other":                      http.StatusNotFound,
		"/debug/web":                  http.StatusMovedPermanently,
		"/debug/web/static/app.js":    http.StatusOK,
		"/debug/web/static/style.css": http.StatusOK,
		"/debug/web/static/none.js":   http.StatusNotFound,
	} {
		resp, err := client.Get(nd.page.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}

func TestNewRequires(t *testing.T) {
	nd := newNodes(t, 1)[0]
	cfg := Config{RegistryURL: "http://127.0.0.1:1"}
	for name, newWeb := range map[string]func() (*Web, error){
		"router":   func() (*Web, error) { return New(nil, nd.store, nd.metrics.Registry, cfg) },
		"store":    func() (*Web, error) { return New(nd.router, nil, nd.metrics.Registry, cfg) },
		"gatherer": func() (*Web, error) { return New(nd.router, nd.store, nil, cfg) },
		"RegistryURL": func() (*Web, error) {
			return New(nd.router, nd.store, nd.metrics.Registry, Config{RegistryURL: ":30120"})
		},
	} {
		if _, err := newWeb(); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("without %s: %v", name, err)
		}
	}
}

// TestMeasureRefusesCrossOrigin: Measure Image Pull runs for the page
// itself (same-origin, through kubectl port-forward too) and for curl, and
// is refused, before it pulls anything, to a form or script of another
// site; reading the page stays open.
func TestMeasureRefusesCrossOrigin(t *testing.T) {
	nodes := newNodes(t, 2)
	nodes[1].holdImage(t, "example.com/team/app:v1", 1000)
	page := nodes[0].page.URL
	host := strings.TrimPrefix(page, "http://")
	tests := []struct {
		name    string
		method  string
		path    string
		host    string // Host header; the page's address when empty
		headers []string
		status  int
	}{
		{"cross-site form", "POST", "measure", "", []string{"Sec-Fetch-Site", "cross-site", "Origin", "https://evil.example"}, 403},
		{"same-site page", "POST", "measure", "", []string{"Sec-Fetch-Site", "same-site", "Origin", "http://other.node.example"}, 403},
		{"older browser, foreign Origin", "POST", "measure", "", []string{"Origin", "https://evil.example"}, 403},
		{"Origin with another port", "POST", "measure", "", []string{"Origin", "http://127.0.0.1:1"}, 403},
		{"cross-site DELETE", "DELETE", "measure", "", []string{"Sec-Fetch-Site", "cross-site"}, 403},
		{"the page itself", "POST", "measure", "", []string{"Sec-Fetch-Site", "same-origin", "Origin", page}, 200},
		{"through kubectl port-forward", "POST", "measure", "localhost:30123",
			[]string{"Sec-Fetch-Site", "same-origin", "Origin", "http://localhost:30123"}, 200},
		{"older browser, port-forward", "POST", "measure", "localhost:30123", []string{"Origin", "http://localhost:30123"}, 200},
		{"typed into the address bar", "POST", "measure", "", []string{"Sec-Fetch-Site", "none"}, 200},
		{"curl", "POST", "measure", "", nil, 200},
		{"cross-site read of stats", "GET", "stats", "", []string{"Sec-Fetch-Site", "cross-site", "Origin", "https://evil.example"}, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, page+Path+tt.path, strings.NewReader(url.Values{"image": {"example.com/team/app:v1"}}.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.Host = host
			if tt.host != "" {
				req.Host = tt.host
			}
			for i := 0; i+1 < len(tt.headers); i += 2 {
				req.Header.Set(tt.headers[i], tt.headers[i+1])
			}
			before := requests(t, nodes[0])
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Fatalf("%s: %d %s, want %d", tt.name, resp.StatusCode, body, tt.status)
			}
			if tt.status != http.StatusForbidden {
				return
			}
			var e errorBody
			if err := json.Unmarshal(body, &e); err != nil || !strings.Contains(e.Error, "refused") {
				t.Errorf("403 body %q does not say why", body)
			}
			if after := requests(t, nodes[0]); after != before {
				t.Errorf("a refused measurement still pulled: %v requests before, %v after", before, after)
			}
		})
	}
}

// requests is how many requests the node's registry counted.
func requests(t *testing.T, nd *node) float64 {
	t.Helper()
	mfs, err := nd.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() == "fleetmirror_mirror_requests_total" {
			for _, m := range mf.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}
