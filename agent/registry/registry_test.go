package registry

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetmirror/fleetmirror/agent/fetch"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

// node is one agent's registry on a loopback listener.
type node struct {
	store   *storetest.Memory
	metrics *metrics.Metrics
	addr    netip.AddrPort
	router  routing.Router
	srv     *httptest.Server
}

// newNodes starts n registries whose routers share one table. wrap, when
// set, may replace a node's handler (to make it misbehave).
func newNodes(t testing.TB, n int, wrap func(i int, h http.Handler) http.Handler) []*node {
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
		nd := &node{store: storetest.NewMemory(), metrics: metrics.New(func() int { return 0 }), addr: addrs[i], router: routers[i]}
		m, err := fetch.New(routers[i], fetch.WithMetrics(nd.metrics),
			fetch.WithResolveTimeout(testResolveTimeout), fetch.WithStallTimeout(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		reg, err := New(nd.store, WithFetcher(m), WithMetrics(nd.metrics))
		if err != nil {
			t.Fatal(err)
		}
		var h http.Handler = reg
		if wrap != nil {
			h = wrap(i, h)
		}
		nd.srv = &httptest.Server{Listener: lns[i], Config: &http.Server{Handler: h}}
		nd.srv.Start()
		t.Cleanup(nd.srv.Close)
		nodes[i] = nd
	}
	return nodes
}

// hold puts content in a node's store and advertises it.
func (nd *node) hold(t testing.TB, mediaType string, b []byte, tagKeys ...string) digest.Digest {
	t.Helper()
	d := nd.store.Add(mediaType, b, tagKeys...)
	keys := append([]string{d.String()}, tagKeys...)
	if err := nd.router.Advertise(context.Background(), keys); err != nil {
		t.Fatal(err)
	}
	return d
}

func get(t *testing.T, method, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestServesLocalContent(t *testing.T) {
	nodes := newNodes(t, 1, nil)
	nd := nodes[0]
	manifest := []byte(`{"schemaVersion":2}`)
	md := nd.hold(t, ocispec.MediaTypeImageManifest, manifest, "docker.io/library/app:v1")
	layer := randomBytes(t, 100_000)
	ld := nd.hold(t, ocispec.MediaTypeImageLayer, layer)
	base := nd.srv.URL

	tests := []struct {
		name, method, path string
		hdr                []string
		status             int
		body               []byte
		headers            map[string]string
	}{
		{name: "api version", method: "GET", path: "/v2/", status: 200,
			headers: map[string]string{"Docker-Distribution-API-Version": "registry/2.0"}},
		{name: "head manifest by tag", method: "HEAD", path: "/v2/library/app/manifests/v1?ns=docker.io", status: 200,
			headers: map[string]string{"Docker-Content-Digest": md.String(), "Content-Type": ocispec.MediaTypeImageManifest,
				"Content-Length": fmt.Sprint(len(manifest))}},
		{name: "get manifest by digest", method: "GET", path: "/v2/library/app/manifests/" + md.String() + "?ns=docker.io",
			status: 200, body: manifest},
		{name: "tag of another registry", method: "HEAD", path: "/v2/library/app/manifests/v1?ns=ghcr.io", status: 404},
		{name: "tag without ns, held for one registry", method: "HEAD", path: "/v2/library/app/manifests/v1", status: 200,
			headers: map[string]string{"Docker-Content-Digest": md.String(), "Content-Type": ocispec.MediaTypeImageManifest}},
		{name: "get blob", method: "GET", path: "/v2/library/app/blobs/" + ld.String(), status: 200, body: layer,
			headers: map[string]string{"Docker-Content-Digest": ld.String(), "Content-Type": "application/octet-stream",
				peerproto.SourceHeader: "local"}},
		{name: "range", method: "GET", path: "/v2/library/app/blobs/" + ld.String(), hdr: []string{"Range", "bytes=10-19"},
			status: 206, body: layer[10:20], headers: map[string]string{"Content-Range": "bytes 10-19/100000"}},
		{name: "unknown blob", method: "GET", path: "/v2/library/app/blobs/" + digest.FromString("x").String(), status: 404},
		{name: "push refused", method: "PUT", path: "/v2/library/app/manifests/v2", status: 405},
		{name: "delete refused", method: "DELETE", path: "/v2/library/app/blobs/" + ld.String(), status: 405},
		{name: "bad name", method: "GET", path: "/v2/Bad/manifests/v1", status: 400},
		{name: "not the API", method: "GET", path: "/other", status: 404},
		{name: "livez", method: "GET", path: "/livez", status: 200},
		{name: "readyz", method: "GET", path: "/readyz", status: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := get(t, tt.method, base+tt.path, tt.hdr...)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.status, body)
			}
			if tt.body != nil && !bytes.Equal(body, tt.body) {
				t.Fatalf("body differs (%d bytes, want %d)", len(body), len(tt.body))
			}
			for k, v := range tt.headers {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if resp.StatusCode >= 400 && tt.method != "HEAD" && strings.HasPrefix(tt.path, "/v2/") {
				var e struct {
					Errors []struct{ Code, Message string }
				}
				if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 || e.Errors[0].Message == "" {
					t.Fatalf("not an OCI error body: %s", body)
				}
			}
		})
	}
}

func TestProxiesFromPeer(t *testing.T) {
	nodes := newNodes(t, 2, nil)
	manifest := []byte(`{"schemaVersion":2,"x":1}`)
	md := nodes[1].hold(t, ocispec.MediaTypeImageManifest, manifest, "10.1.2.3:5000/team/app:v1")
	layer := randomBytes(t, 3<<20)
	ld := nodes[1].hold(t, ocispec.MediaTypeImageLayer, layer)
	base := nodes[0].srv.URL

	resp, _ := get(t, "HEAD", base+"/v2/team/app/manifests/v1?ns=10.1.2.3:5000")
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != md.String() {
		t.Fatalf("head by tag through peer: %d %q", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
	}
	resp, body := get(t, "GET", base+"/v2/team/app/manifests/"+md.String()+"?ns=10.1.2.3:5000")
	if resp.StatusCode != 200 || !bytes.Equal(body, manifest) || resp.Header.Get("Content-Type") != ocispec.MediaTypeImageManifest {
		t.Fatalf("manifest through peer: %d %q", resp.StatusCode, body)
	}
	resp, body = get(t, "GET", base+"/v2/team/app/blobs/"+ld.String()+"?ns=10.1.2.3:5000")
	if resp.StatusCode != 200 || !bytes.Equal(body, layer) {
		t.Fatalf("blob through peer: %d, %d bytes", resp.StatusCode, len(body))
	}
	if got, want := resp.Header.Get(peerproto.SourceHeader), "peer "+nodes[1].addr.String(); got != want {
		t.Errorf("%s = %q, want %q", peerproto.SourceHeader, got, want)
	}
	if got := testutil.ToFloat64(nodes[0].metrics.Requests.WithLabelValues("10.1.2.3:5000", "blob", metrics.OutcomePeer)); got != 1 {
		t.Errorf("peer blob requests = %v, want 1", got)
	}
	if got := testutil.ToFloat64(nodes[1].metrics.ServedToPeers); got < float64(len(layer)) {
		t.Errorf("served to peers = %v, want at least %d", got, len(layer))
	}
	if testutil.ToFloat64(nodes[0].metrics.LastSuccess) == 0 {
		t.Error("last mirror success not set")
	}

	// A request from a peer is never forwarded: node 0 lacks the blob.
	resp, _ = get(t, "GET", base+"/v2/team/app/blobs/"+ld.String(), peerproto.PeerHeader, "1")
	if resp.StatusCode != 404 {
		t.Fatalf("peer request was forwarded: %d", resp.StatusCode)
	}
}

// testResolveTimeout is the resolve timeout of newNodes' mirrors.
const testResolveTimeout = 50 * time.Millisecond

// TestMissIsFast: a blob no peer holds costs one resolve timeout, not a
// peer's header or stall timeout, before containerd is sent upstream. The
// bound is the median of several misses against the resolve timeout plus
// a wide margin, so a busy machine does not fail it but a miss that waits
// for anything else does.
func TestMissIsFast(t *testing.T) {
	nodes := newNodes(t, 2, nil)
	const misses = 7
	took := make([]time.Duration, misses)
	for i := range took {
		start := time.Now()
		resp, _ := get(t, "GET", nodes[0].srv.URL+"/v2/app/blobs/"+digest.FromString(fmt.Sprint("nobody", i)).String())
		took[i] = time.Since(start)
		if resp.StatusCode != 404 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	slices.Sort(took)
	t.Logf("misses took %v", took)
	if p50, bound := took[misses/2], testResolveTimeout+450*time.Millisecond; p50 > bound {
		t.Errorf("median miss took %s, want under %s (resolve timeout %s plus margin)", p50, bound, testResolveTimeout)
	}
	if got := testutil.ToFloat64(nodes[0].metrics.Requests.WithLabelValues("unknown", "blob", metrics.OutcomeMiss)); got != misses {
		t.Errorf("misses = %v, want %d", got, misses)
	}
}

// Peers that misbehave: each test makes node 1 bad in one way and node 2
// good; the pull through node 0 must get the right bytes whichever is asked
// first. A small blob is verified before its first byte, so even wrong
// bytes cost nothing; a streamed one with wrong bytes is cut before its
// end, and the retry (containerd's next attempt) skips the bad peer.
func TestPeerFailover(t *testing.T) {
	for _, size := range []int{fetch.WholeBelow - 1, fetch.WholeBelow + 1<<20} {
		t.Run(fmt.Sprintf("%d bytes", size), func(t *testing.T) { peerFailover(t, size) })
	}
}

func peerFailover(t *testing.T, size int) {
	layer := randomBytes(t, size)
	ld := digest.FromBytes(layer)
	streamed := size >= fetch.WholeBelow
	bad := map[string]func(w http.ResponseWriter, r *http.Request, next http.Handler){
		"wrong bytes": func(w http.ResponseWriter, r *http.Request, next http.Handler) {
			w.Header().Set("Docker-Content-Digest", ld.String())
			w.Header().Set("Content-Length", fmt.Sprint(len(layer)))
			w.WriteHeader(200)
			corrupt := bytes.Clone(layer)
			corrupt[len(corrupt)/2] ^= 0xff
			w.Write(corrupt)
		},
		"cut short": func(w http.ResponseWriter, r *http.Request, next http.Handler) {
			if r.Header.Get("Range") != "" {
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Docker-Content-Digest", ld.String())
			w.Header().Set("Content-Length", fmt.Sprint(len(layer)))
			w.WriteHeader(200)
			w.Write(layer[:len(layer)/3])
			panic(http.ErrAbortHandler)
		},
		"stalls": func(w http.ResponseWriter, r *http.Request, next http.Handler) {
			w.Header().Set("Docker-Content-Digest", ld.String())
			w.Header().Set("Content-Length", fmt.Sprint(len(layer)))
			w.WriteHeader(200)
			w.Write(layer[:1000])
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		},
		"server error": func(w http.ResponseWriter, r *http.Request, next http.Handler) {
			http.Error(w, "boom", 500)
		},
	}
	for name, misbehave := range bad {
		t.Run(name, func(t *testing.T) {
			var mu sync.Mutex
			badHits := 0
			nodes := newNodes(t, 3, func(i int, h http.Handler) http.Handler {
				if i != 1 {
					return h
				}
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if strings.Contains(r.URL.Path, "/blobs/") && r.Method == "GET" {
						mu.Lock()
						badHits++
						mu.Unlock()
						misbehave(w, r, h)
						return
					}
					h.ServeHTTP(w, r)
				})
			})
			// Node 1 advertises first so the memory router returns it first.
			nodes[1].hold(t, ocispec.MediaTypeImageLayer, layer)
			nodes[2].hold(t, ocispec.MediaTypeImageLayer, layer)
			url := nodes[0].srv.URL + "/v2/app/blobs/" + ld.String()
			if streamed && name == "wrong bytes" {
				resp, err := http.Get(url)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err == nil || len(body) >= len(layer) {
					t.Fatalf("a wrong streamed blob was not cut: %d of %d bytes, err %v", len(body), len(layer), err)
				}
			}
			resp, body := get(t, "GET", url)
			if resp.StatusCode != 200 || digest.FromBytes(body) != ld {
				t.Fatalf("status %d, digest %s", resp.StatusCode, digest.FromBytes(body))
			}
			if badHits == 0 {
				t.Fatal("the bad peer was never asked: the test proves nothing")
			}
		})
	}
}

// A peer whose Docker-Content-Digest names other content is not believed:
// a HEAD, which containerd answers its resolve with, fails over to the
// next peer and answers the digest asked for, with the size it holds.
func TestHeadSkipsWrongDigestHeader(t *testing.T) {
	layer := randomBytes(t, 1<<20)
	ld := digest.FromBytes(layer)
	var mu sync.Mutex
	badHits := 0
	nodes := newNodes(t, 3, func(i int, h http.Handler) http.Handler {
		if i != 1 {
			return h
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			badHits++
			mu.Unlock()
			w.Header().Set("Docker-Content-Digest", digest.FromString("other").String())
			w.Header().Set("Content-Length", fmt.Sprint(len(layer)+1))
			w.WriteHeader(200)
		})
	})
	// Node 1 advertises first so the memory router returns it first.
	nodes[1].hold(t, ocispec.MediaTypeImageLayer, layer)
	nodes[2].hold(t, ocispec.MediaTypeImageLayer, layer)
	resp, _ := get(t, "HEAD", nodes[0].srv.URL+"/v2/app/blobs/"+ld.String())
	if resp.StatusCode != 200 {
		t.Fatalf("status %d, want 200 from the good peer", resp.StatusCode)
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != ld.String() {
		t.Errorf("Docker-Content-Digest %q, want %s", got, ld)
	}
	if resp.ContentLength != int64(len(layer)) {
		t.Errorf("Content-Length %d, want %d", resp.ContentLength, len(layer))
	}
	if badHits == 0 {
		t.Fatal("the bad peer was never asked: the test proves nothing")
	}
}

// When the only peer serves wrong bytes, containerd must get a 404 (and go
// upstream), never a 200 with those bytes.
func TestOnlyBadPeerGives404(t *testing.T) {
	layer := randomBytes(t, 1<<20)
	ld := digest.FromBytes(layer)
	nodes := newNodes(t, 2, func(i int, h http.Handler) http.Handler {
		if i != 1 {
			return h
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Docker-Content-Digest", ld.String())
			w.Header().Set("Content-Length", fmt.Sprint(len(layer)))
			w.Write(make([]byte, len(layer)))
		})
	})
	nodes[1].hold(t, ocispec.MediaTypeImageLayer, layer)
	resp, _ := get(t, "GET", nodes[0].srv.URL+"/v2/app/blobs/"+ld.String())
	if resp.StatusCode != 404 {
		t.Fatalf("status %d, want 404", resp.StatusCode)
	}
	resp, _ = get(t, "GET", nodes[0].srv.URL+"/v2/app/manifests/"+ld.String())
	if resp.StatusCode != 404 {
		t.Fatalf("manifest status %d, want 404", resp.StatusCode)
	}
	// The manifest request did not ask the peer that lied about this digest.
	if got := testutil.ToFloat64(nodes[0].metrics.PeerFailures.WithLabelValues("digest")); got != 1 {
		t.Errorf("digest failures = %v, want 1", got)
	}
}

// A lookup can miss the resolve timeout on a busy node. A blob named by a
// manifest that a peer just served is then fetched from that peer rather
// than sent upstream; a blob nobody hinted still misses fast.
func TestManifestPeerHintsItsBlobs(t *testing.T) {
	nodes := newNodes(t, 2, nil)
	layer := randomBytes(t, 1<<20)
	// In node 1's store but never advertised: no lookup finds it.
	ld := nodes[1].store.Add(ocispec.MediaTypeImageLayer, layer)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"` + ocispec.MediaTypeImageManifest + `","config":{"mediaType":"` + ocispec.MediaTypeImageConfig +
		`","digest":"` + digest.FromString("{}").String() + `","size":2},"layers":[{"mediaType":"` + ocispec.MediaTypeImageLayer +
		`","digest":"` + ld.String() + `","size":` + fmt.Sprint(len(layer)) + `}]}`)
	md := nodes[1].hold(t, ocispec.MediaTypeImageManifest, manifest)
	base := nodes[0].srv.URL

	resp, _ := get(t, "GET", base+"/v2/team/app/blobs/"+ld.String()+"?ns=10.1.2.3:5000")
	if resp.StatusCode != 404 {
		t.Fatalf("blob before its manifest was fetched: %d, want a miss", resp.StatusCode)
	}
	resp, body := get(t, "GET", base+"/v2/team/app/manifests/"+md.String()+"?ns=10.1.2.3:5000")
	if resp.StatusCode != 200 || !bytes.Equal(body, manifest) {
		t.Fatalf("manifest through peer: %d %q", resp.StatusCode, body)
	}
	resp, body = get(t, "GET", base+"/v2/team/app/blobs/"+ld.String()+"?ns=10.1.2.3:5000")
	if resp.StatusCode != 200 || !bytes.Equal(body, layer) {
		t.Fatalf("hinted blob: %d, %d bytes", resp.StatusCode, len(body))
	}
	if got, want := resp.Header.Get(peerproto.SourceHeader), "peer "+nodes[1].addr.String(); got != want {
		t.Errorf("%s = %q, want %q", peerproto.SourceHeader, got, want)
	}
	// The config is hinted too, but node 1 lacks it: one 404 from the
	// hinted peer, then a miss.
	resp, _ = get(t, "GET", base+"/v2/team/app/blobs/"+digest.FromString("{}").String()+"?ns=10.1.2.3:5000")
	if resp.StatusCode != 404 {
		t.Fatalf("hinted blob the peer lacks: %d, want 404", resp.StatusCode)
	}
}

// A manifest HEAD answered from peers carries the size and digest this
// agent verified, not what a peer claims: a peer whose HEAD lies about the
// size is corrected, and one whose body does not match is not believed.
func TestManifestHeadFromPeersIsVerified(t *testing.T) {
	man := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}`)
	for _, tt := range []struct {
		name   string
		lie    func(w http.ResponseWriter, r *http.Request, next http.Handler)
		status int
	}{
		{"HEAD claims another size", func(w http.ResponseWriter, r *http.Request, next http.Handler) {
			if r.Method == http.MethodHead {
				w.Header().Set("Docker-Content-Digest", digest.FromBytes(man).String())
				w.Header().Set("Content-Length", "999999")
				return
			}
			next.ServeHTTP(w, r)
		}, 200},
		{"body does not match its digest", func(w http.ResponseWriter, r *http.Request, next http.Handler) {
			w.Header().Set("Docker-Content-Digest", digest.FromBytes(man).String())
			w.Header().Set("Content-Length", fmt.Sprint(len(man)))
			w.Write(bytes.Repeat([]byte("x"), len(man)))
		}, 404},
	} {
		t.Run(tt.name, func(t *testing.T) {
			nodes := newNodes(t, 2, func(i int, h http.Handler) http.Handler {
				if i != 1 {
					return h
				}
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if strings.Contains(r.URL.Path, "/manifests/") {
						tt.lie(w, r, h)
						return
					}
					h.ServeHTTP(w, r)
				})
			})
			nodes[1].hold(t, ocispec.MediaTypeImageManifest, man, "docker.io/library/app:v1")
			resp, _ := get(t, "HEAD", nodes[0].srv.URL+"/v2/library/app/manifests/v1?ns=docker.io")
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			if tt.status == 200 && resp.ContentLength != int64(len(man)) {
				t.Errorf("HEAD answered size %d, want the verified %d", resp.ContentLength, len(man))
			}
		})
	}
}
