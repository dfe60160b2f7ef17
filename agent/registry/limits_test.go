package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/fetch"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

// serveOn serves h on ln until the test ends and returns its URL.
func serveOn(t *testing.T, ln net.Listener, h http.Handler) string {
	t.Helper()
	srv := &httptest.Server{Listener: ln, Config: &http.Server{Handler: h}}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

func listen(t *testing.T) (net.Listener, netip.AddrPort) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln, netip.MustParseAddrPort(ln.Addr().String())
}

// series counts the agent's own series (fleetmirror_*) and the registry
// label values of the requests counter.
func series(t *testing.T, m *metrics.Metrics) (n int, registries map[string]bool) {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	registries = map[string]bool{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "fleetmirror_") {
			continue
		}
		n += len(mf.GetMetric())
		if mf.GetName() != "fleetmirror_mirror_requests_total" {
			continue
		}
		for _, s := range mf.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetName() == "registry" {
					registries[l.GetValue()] = true
				}
			}
		}
	}
	return n, registries
}

// TestRandomNSKeepsSeriesFlat: 20,000 requests, each naming a registry
// never seen before in ?ns=, half served from the node's store and half
// missing, leave the number of series where it was; mirroring every
// registry, at most MaxOpenRegistries get a label of their own.
func TestRandomNSKeepsSeriesFlat(t *testing.T) {
	const requests = 20000
	for _, tt := range []struct {
		name       string
		configured []string
	}{
		{"configured registries", []string{"docker.io", "ghcr.io"}},
		{"mirroring every registry", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ln, addr := listen(t)
			m := metrics.New(func() int { return 0 }, metrics.WithRegistries(tt.configured))
			st := storetest.NewMemory()
			held := st.Add(ocispec.MediaTypeImageLayer, []byte("layer"))
			missing := digest.FromString("held by nobody")
			mir, err := fetch.New(routing.NewMemory(addr)[0], fetch.WithResolveTimeout(50*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			reg, err := New(st, WithFetcher(mir), WithMetrics(m))
			if err != nil {
				t.Fatal(err)
			}
			url := serveOn(t, ln, reg)
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
			t.Cleanup(client.CloseIdleConnections)
			ask := func(i int, ns string) {
				method, d, want := http.MethodHead, held, http.StatusOK
				if i%2 == 1 {
					method, d, want = http.MethodGet, missing, http.StatusNotFound
				}
				u := url + "/v2/team/app/blobs/" + d.String()
				if ns != "" {
					u += "?ns=" + ns
				}
				req, _ := http.NewRequest(method, u, nil)
				resp, err := client.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != want {
					t.Errorf("%s %s: %s, want %d", method, u, resp.Status, want)
				}
			}
			// Every label a request can have today, both outcomes each.
			for i := range 2 {
				for _, ns := range append([]string{"", "quay.io"}, tt.configured...) {
					ask(i, ns)
				}
			}
			before, _ := series(t, m)

			var wg sync.WaitGroup
			for w := range 4 {
				wg.Go(func() {
					for i := w; i < requests; i += 4 {
						ask(i, fmt.Sprintf("r%d.attacker.example", i))
					}
				})
			}
			wg.Wait()
			after, registries := series(t, m)
			t.Logf("%d requests: %d series before, %d after; registry labels %v", requests, before, after, registries)
			open := 0
			if len(tt.configured) == 0 {
				open = metrics.MaxOpenRegistries
			}
			// Two outcomes (local, miss) per registry label.
			if after > before+2*open {
				t.Errorf("series grew from %d to %d", before, after)
			}
			if most := len(tt.configured) + 2 + open; len(registries) > most {
				t.Errorf("%d registry label values, want at most %d", len(registries), most)
			}
			for _, r := range tt.configured {
				if !registries[r] {
					t.Errorf("configured registry %s has no label of its own", r)
				}
			}
		})
	}
}

// ociError reads the first error of an OCI error body.
func ociError(t *testing.T, body []byte) (code, message string) {
	t.Helper()
	var e struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) == 0 {
		t.Fatalf("not an OCI error body: %q", body)
	}
	return e.Errors[0].Code, e.Errors[0].Message
}

// from returns a client whose connections come from the loopback address ip.
func from(ip string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	return &http.Client{Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}}
}

// TestLimits: an agent that allows 2 requests at once (1 per client IP)
// answers a client holding its share 429 and a third client 503, both
// with Retry-After and an OCI error body, while the requests in progress
// (a blob streamed from a peer for the node's containerd, held open by
// that peer) finish intact; then it serves again.
func TestLimits(t *testing.T) {
	lnA, addrA := listen(t)
	lnB, addrB := listen(t)
	routers := routing.NewMemory(addrA, addrB)

	// B holds the blob and answers peers only once the test lets it.
	stB := storetest.NewMemory()
	blob := randomBytes(t, 1<<20)
	d := stB.Add(ocispec.MediaTypeImageLayer, blob)
	if err := routers[1].Advertise(context.Background(), []string{d.String()}); err != nil {
		t.Fatal(err)
	}
	regB, err := New(stB)
	if err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{}, 16)
	gate, open := context.WithCancel(context.Background())
	serveOn(t, lnB, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-gate.Done()
		regB.ServeHTTP(w, r)
	}))
	t.Cleanup(open) // before the servers close, should the test fail early

	mir, err := fetch.New(routers[0], fetch.WithResolveTimeout(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	regA, err := New(storetest.NewMemory(), WithFetcher(mir), WithMaxRequests(2))
	if err != nil {
		t.Fatal(err)
	}
	urlA := serveOn(t, lnA, regA)
	blobURL := urlA + "/v2/team/app/blobs/" + d.String() + "?ns=example.com"

	type result struct {
		status int
		body   []byte
	}
	pull := func(c *http.Client) <-chan result {
		ch := make(chan result, 1)
		go func() {
			resp, err := c.Get(blobURL)
			if err != nil {
				ch <- result{}
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			ch <- result{resp.StatusCode, b}
		}()
		return ch
	}
	wait := func() {
		t.Helper()
		select {
		case <-entered:
		case <-time.After(5 * time.Second):
			t.Fatal("the peer was never asked")
		}
	}
	first := pull(from("127.0.0.1"))
	wait()

	check := func(c *http.Client, hdr []string, wantStatus int, wantCode string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, urlA+"/v2/team/app/blobs/"+d.String(), nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != wantStatus || resp.Header.Get("Retry-After") != "1" {
			t.Fatalf("status %s, Retry-After %q, want %d and 1: %s", resp.Status, resp.Header.Get("Retry-After"), wantStatus, body)
		}
		if code, msg := ociError(t, body); code != wantCode {
			t.Errorf("error code %s (%s), want %s", code, msg, wantCode)
		} else {
			t.Logf("%d %s: %s", wantStatus, code, msg)
		}
	}
	// The same client again, as containerd or as a peer: over its share.
	check(from("127.0.0.1"), nil, http.StatusTooManyRequests, "TOOMANYREQUESTS")
	check(from("127.0.0.1"), []string{peerproto.PeerHeader, "1"}, http.StatusTooManyRequests, "TOOMANYREQUESTS")

	second := pull(from("127.0.0.2"))
	wait()
	check(from("127.0.0.3"), nil, http.StatusServiceUnavailable, "UNAVAILABLE")

	open()
	for _, ch := range []<-chan result{first, second} {
		if r := <-ch; r.status != http.StatusOK || string(r.body) != string(blob) {
			t.Errorf("a request in progress got %d with %d bytes, want 200 with the blob", r.status, len(r.body))
		}
	}
	if r := <-pull(from("127.0.0.3")); r.status != http.StatusOK {
		t.Errorf("after the others ended: %d, want 200", r.status)
	}
}

// TestRanges: a Range that selects no byte (bytes=-0 among them) gets a
// 416 with Content-Range "bytes */<size>", for content from this node's
// store and from peers; an over-long or repeated Range header gets a 400.
func TestRanges(t *testing.T) {
	nodes := newNodes(t, 2, nil)
	layer := []byte("0123456789")
	ld := nodes[0].hold(t, ocispec.MediaTypeImageLayer, layer)
	manifest := []byte(`{"schemaVersion":2}`)
	md := nodes[1].hold(t, ocispec.MediaTypeImageManifest, manifest)
	local := nodes[0].srv.URL + "/v2/app/blobs/" + ld.String()
	fromPeer := nodes[0].srv.URL + "/v2/app/manifests/" + md.String() + "?ns=example.com"

	for _, tt := range []struct {
		url, rng string
		size     int
		status   int
		crange   string
	}{
		{local, "bytes=-0", 10, http.StatusRequestedRangeNotSatisfiable, "bytes */10"},
		{fromPeer, "bytes=-0", len(manifest), http.StatusRequestedRangeNotSatisfiable, fmt.Sprintf("bytes */%d", len(manifest))},
		{local, "bytes=10-", 10, http.StatusRequestedRangeNotSatisfiable, "bytes */10"},
		{local, "bytes=5-2", 10, http.StatusRequestedRangeNotSatisfiable, "bytes */10"},
		{local, "bytes=0-1,3-4", 10, http.StatusRequestedRangeNotSatisfiable, "bytes */10"},
		{local, "bytes=+1-", 10, http.StatusRequestedRangeNotSatisfiable, "bytes */10"},
		{local, "items=0-1", 10, http.StatusRequestedRangeNotSatisfiable, "bytes */10"},
		{local, "bytes=-3", 10, http.StatusPartialContent, "bytes 7-9/10"},
		{local, "bytes=4-", 10, http.StatusPartialContent, "bytes 4-9/10"},
		{local, "bytes=2-300", 10, http.StatusPartialContent, "bytes 2-9/10"},
		{local, "bytes=" + strings.Repeat("0", 64) + "-", 10, http.StatusBadRequest, ""},
	} {
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			resp, body := get(t, method, tt.url, "Range", tt.rng)
			if resp.StatusCode != tt.status || resp.Header.Get("Content-Range") != tt.crange {
				t.Errorf("%s %s Range %s: %s, Content-Range %q; want %d, %q", method, tt.url, tt.rng, resp.Status,
					resp.Header.Get("Content-Range"), tt.status, tt.crange)
			}
			if resp.StatusCode >= 400 && method == http.MethodGet {
				if code, _ := ociError(t, body); code != "RANGE_INVALID" {
					t.Errorf("Range %s: code %s, want RANGE_INVALID", tt.rng, code)
				}
			}
		}
	}

	req, _ := http.NewRequest(http.MethodGet, local, nil)
	req.Header.Add("Range", "bytes=0-")
	req.Header.Add("Range", "bytes=1-")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("two Range headers: %s, want 400", resp.Status)
	}
}
