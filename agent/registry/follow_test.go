package registry

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetmirror/fleetmirror/agent/claim"
	"github.com/fleetmirror/fleetmirror/agent/fetch"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

// writeIngest lays out an ingest of d in containerd's content directory
// dir, as containerd does while it writes a layer, and returns its folder.
func writeIngest(t *testing.T, dir, name string, d digest.Digest, total int, data []byte) string {
	t.Helper()
	ing := filepath.Join(dir, "ingest", name)
	if err := os.MkdirAll(ing, 0o755); err != nil {
		t.Fatal(err)
	}
	for file, body := range map[string][]byte{
		"ref": []byte("k8s.io/1/layer-" + d.String()), "total": []byte(strconv.Itoa(total)), "data": data,
	} {
		if err := os.WriteFile(filepath.Join(ing, file), body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return ing
}

// noHolds is a Holder that holds nothing in flight.
type noHolds struct{}

func (noHolds) Hold(string)         {}
func (noHolds) Holding(string) bool { return false }

// A node that waits for the node it agreed to follow has advertised
// nothing yet, but a node whose view of the claimants picked it instead
// is served the blob in flight from its containerd's ingest as it
// arrives, not sent upstream with a 404 (20-node bursts: a third of the
// upstream fetches). A node that neither holds nor follows the blob still
// answers 404.
func TestFollowerServesInFlightWhileItWaits(t *testing.T) {
	blob := randomBytes(t, 3000)
	d := digest.FromBytes(blob)
	dir := t.TempDir()
	writeIngest(t, dir, "x", d, len(blob), blob)
	reg, err := New(storetest.NewMemory(), WithInFlight(store.NewInFlight(dir, time.Second), noHolds{}))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	url := srv.URL + "/v2/team/app/blobs/" + d.String() + "?ns=example.com"
	hdr := []string{peerproto.PeerHeader, "1", peerproto.WaitHeader, "200ms"}

	if resp, _ := get(t, http.MethodGet, url, hdr...); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("neither holding nor following: status %d, want 404", resp.StatusCode)
	}
	reg.follows.add(d, 1)
	resp, body := get(t, http.MethodGet, url, hdr...)
	if resp.StatusCode != http.StatusOK || string(body) != string(blob) {
		t.Fatalf("following: status %d, %d bytes; want 200 and the blob", resp.StatusCode, len(body))
	}
	reg.follows.add(d, -1)
	if reg.follows.has(d) {
		t.Error("the blob is still counted as followed after the wait ended")
	}
}

// A blob in flight whose ingest is still empty: a node that agreed to
// follow this one (it sends the wait header) waits for its first bytes
// beyond the stall timeout; any other peer is cut after the stall timeout,
// as before, so a stale empty ingest cannot hold it for long.
func TestOnlyFollowersWaitForTheFirstByte(t *testing.T) {
	blob := randomBytes(t, 3000)
	d := digest.FromBytes(blob)
	for _, tt := range []struct {
		name string
		hdr  []string
		ok   bool
	}{
		{"follower", []string{peerproto.PeerHeader, "1", peerproto.WaitHeader, "1s"}, true},
		{"other peer", []string{peerproto.PeerHeader, "1"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			ing := writeIngest(t, dir, "x", d, len(blob), nil)
			reg, err := New(storetest.NewMemory(), WithInFlight(store.NewInFlight(dir, 100*time.Millisecond), noHolds{}))
			if err != nil {
				t.Fatal(err)
			}
			reg.follows.add(d, 1)
			srv := httptest.NewServer(reg)
			defer srv.Close()
			// The writer's bytes come after several stall timeouts.
			time.AfterFunc(600*time.Millisecond, func() { os.WriteFile(filepath.Join(ing, "data"), blob, 0o644) })
			req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v2/team/app/blobs/"+d.String()+"?ns=example.com", nil)
			for i := 0; i+1 < len(tt.hdr); i += 2 {
				req.Header.Set(tt.hdr[i], tt.hdr[i+1])
			}
			resp, err := http.DefaultClient.Do(req)
			var body []byte
			if err == nil {
				body, err = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
			if got := err == nil && string(body) == string(blob); got != tt.ok {
				t.Errorf("got the blob: %v (err %v), want %v", got, err, tt.ok)
			}
		})
	}
}

// recordingClaims records which keys this node claimed.
type recordingClaims struct {
	routing.Claims
	recorded
}

func (c *recordingClaims) Claim(ctx context.Context, kind routing.ClaimKind, key string) error {
	c.add(key)
	return c.Claims.Claim(ctx, kind, key)
}

// recorded is a set of keys that tests' fakes saw, safe for handlers.
type recorded struct {
	mu   sync.Mutex
	keys []string
}

func (r *recorded) add(key string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = append(r.keys, key)
}

func (r *recorded) has(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.keys, key)
}

// A blob nobody holds is agreed on with the other nodes that miss it,
// unless containerd's ingest says it is small (an image's config): that
// one goes upstream at once, without the agreement's wait.
func TestSmallBlobsSkipTheAgreement(t *testing.T) {
	dir := t.TempDir()
	small, large := digest.FromString("config"), digest.FromString("layer")
	writeIngest(t, dir, "a", small, 2000, nil)
	writeIngest(t, dir, "b", large, agreeFrom, nil)
	unknown := digest.FromString("no ingest")

	rs := routing.NewMemory(netip.MustParseAddrPort("127.0.0.1:1"))
	claims := &recordingClaims{Claims: rs[0]}
	f, err := fetch.New(rs[0], fetch.WithResolveTimeout(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(func() int { return 0 })
	reg, err := New(storetest.NewMemory(), WithFetcher(f), WithInFlight(store.NewInFlight(dir, time.Second), noHolds{}),
		WithClaims(claim.New(claims, 20*time.Millisecond, nil)), WithMetrics(m))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	defer func() {
		// A lone node fetches what it agreed on itself.
		wantWave(t, m, map[string]float64{metrics.WaveSmall: 1, metrics.WaveFetched: 2})
	}()
	for _, tt := range []struct {
		d     digest.Digest
		agree bool
	}{{small, false}, {large, true}, {unknown, true}} {
		resp, _ := get(t, http.MethodGet, srv.URL+"/v2/team/app/blobs/"+tt.d.String()+"?ns=example.com")
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s: status %d, want 404 (nobody holds it)", tt.d, resp.StatusCode)
		}
		if got := claims.has(tt.d.String()); got != tt.agree {
			t.Errorf("%s: claimed %v, want %v", tt.d, got, tt.agree)
		}
	}
}

// holds is a Holder that holds the digests it lists.
type holds []digest.Digest

func (h holds) Hold(string)           {}
func (h holds) Holding(d string) bool { return slices.Contains(h, digest.Digest(d)) }

// A node asks the node its image's agreement picked for a blob before it
// agrees on the blob by itself: it streams the blob from that node when it
// fetches it, and when it does not (a stale answer), it agrees on the blob
// after a short wait, as without the image's agreement.
func TestImageFetcherAskedFirst(t *testing.T) {
	blob := randomBytes(t, 3000)
	held, stale := digest.FromBytes(blob), digest.FromString("a blob of another image")
	// A's containerd writes the blob.
	dirA := t.TempDir()
	writeIngest(t, dirA, "x", held, len(blob), blob)
	var lns [2]net.Listener
	var addrs []netip.AddrPort
	for i := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[i] = ln
		addrs = append(addrs, netip.MustParseAddrPort(ln.Addr().String()))
	}
	rs := routing.NewMemory(addrs...)
	claimsB := &recordingClaims{Claims: rs[1]}
	decA, decB := claim.New(rs[0], 20*time.Millisecond, nil), claim.New(claimsB, 20*time.Millisecond, nil)
	regA, err := New(storetest.NewMemory(), WithInFlight(store.NewInFlight(dirA, time.Second), holds{held}), WithClaims(decA))
	if err != nil {
		t.Fatal(err)
	}
	fB, err := fetch.New(rs[1], fetch.WithResolveTimeout(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	mB := metrics.New(func() int { return 0 })
	regB, err := New(storetest.NewMemory(), WithFetcher(fB), WithClaims(decB), WithMetrics(mB))
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range []http.Handler{regA, regB} {
		srv := &http.Server{Handler: h}
		go srv.Serve(lns[i])
		t.Cleanup(func() { srv.Close() })
	}

	repo := repoFetchedBy(t, decA, decB, addrs[0])
	url := "http://" + addrs[1].String() + "/v2/" + repo + "/blobs/"

	resp, body := get(t, http.MethodGet, url+held.String()+"?ns=example.com")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, blob) {
		t.Errorf("a blob the image's fetcher fetches: status %d, %d bytes; want 200 and the blob", resp.StatusCode, len(body))
	}
	if claimsB.has(held.String()) {
		t.Error("B agreed on a blob the image's fetcher served")
	}
	resp, _ = get(t, http.MethodGet, url+stale.String()+"?ns=example.com")
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("a blob the image's fetcher does not fetch: status %d, want 404 (upstream)", resp.StatusCode)
	}
	if !claimsB.has(stale.String()) {
		t.Error("B did not agree on a blob the image's fetcher did not start on")
	}
	wantWave(t, mB, map[string]float64{metrics.WaveFollowed: 1, metrics.WaveFetched: 1})
}

// repoFetchedBy runs the agreement on images of repositories of
// example.com, pulled by a and b at once, until one picks a (at addr) to
// fetch it, and returns that repository.
func repoFetchedBy(t *testing.T, a, b *claim.Decider, addr netip.AddrPort) string {
	t.Helper()
	for i := range 50 {
		r := fmt.Sprintf("team/app%d", i)
		var wg sync.WaitGroup
		for _, d := range []*claim.Decider{a, b} {
			wg.Go(func() { d.Begin("example.com/"+r+":v1", "example.com/"+r) })
		}
		wg.Wait()
		if f, ok := b.ImageFetcher(context.Background(), "example.com/"+r); ok && f == addr {
			return r
		}
	}
	t.Fatal("no repository's agreement picked the node in 50 tries")
	return ""
}

// A node whose containerd pulls an image waits for a blob of that image
// its containerd has not asked for yet, when the follower asks it to
// (ImageWaitHeader): containerd fetches 3 blobs at a time, and followers
// that gave up on the image's fetcher agreed on the blob anew and fetched
// it a second time (half of the 20-node bursts). So does a node that
// follows the image's fetcher (two nodes picked themselves, and one
// yielded), since it holds the blob as it follows. For a blob of no image
// it pulls, or for a follower that does not ask (an agent before this), it
// answers 404 after the short wait, as before.
func TestImagePullerWaitsForItsImagesBlobs(t *testing.T) {
	later, other, older := randomBytes(t, 3000), randomBytes(t, 3000), randomBytes(t, 3000)
	dLater, dOther, dOlder := digest.FromBytes(later), digest.FromBytes(other), digest.FromBytes(older)
	manifest := fmt.Sprintf(`{"schemaVersion":2,"config":{"digest":%q,"size":2},"layers":[{"digest":%q,"size":3000},{"digest":%q,"size":3000}]}`,
		digest.FromString("{}"), dLater, dOlder)
	dm := digest.FromString(manifest)
	addrs := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2")}
	rs := routing.NewMemory(addrs...)
	decA, decB := claim.New(rs[0], 20*time.Millisecond, nil), claim.New(rs[1], 20*time.Millisecond, nil)
	repo := repoFetchedBy(t, decA, decB, addrs[0])
	for _, node := range []struct {
		name string
		dec  *claim.Decider
	}{{"the image's fetcher", decA}, {"a node that follows it", decB}} {
		t.Run(node.name, func(t *testing.T) {
			dir := t.TempDir()
			// containerd commits the manifest before it asks for what it names.
			if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256", dm.Encoded()), []byte(manifest), 0o644); err != nil {
				t.Fatal(err)
			}
			for i, b := range [][]byte{later, other, older} {
				writeIngest(t, dir, strconv.Itoa(i), digest.FromBytes(b), len(b), b)
			}
			node.dec.Begin(dm.String(), "example.com/"+repo) // the manifest's miss
			held := &recordingHolds{}
			reg, err := New(storetest.NewMemory(), WithInFlight(store.NewInFlight(dir, time.Second), held), WithClaims(node.dec))
			if err != nil {
				t.Fatal(err)
			}
			srv := httptest.NewServer(reg)
			defer srv.Close()
			for _, tt := range []struct {
				name  string
				d     digest.Digest
				body  []byte
				image bool
				want  int
			}{
				{"a blob of its image", dLater, later, true, http.StatusOK},
				{"a blob of no image it pulls", dOther, other, true, http.StatusNotFound},
				{"a follower that does not ask", dOlder, older, false, http.StatusNotFound},
			} {
				// Its containerd asks for the blob well after the short wait.
				timer := time.AfterFunc(time.Second, func() { held.Hold(tt.d.String()) })
				hdr := []string{peerproto.PeerHeader, "1", peerproto.WaitHeader, "100ms"}
				if tt.image {
					hdr = append(hdr, peerproto.ImageWaitHeader, "5s")
				}
				resp, body := get(t, http.MethodGet, srv.URL+"/v2/"+repo+"/blobs/"+tt.d.String()+"?ns=example.com", hdr...)
				timer.Stop()
				if resp.StatusCode != tt.want || tt.want == http.StatusOK && !bytes.Equal(body, tt.body) {
					t.Errorf("%s: status %d, %d bytes; want %d", tt.name, resp.StatusCode, len(body), tt.want)
				}
			}
		})
	}
}

// wantWave checks the first wave's counts by outcome; outcomes not named
// must be zero.
func wantWave(t *testing.T, m *metrics.Metrics, want map[string]float64) {
	t.Helper()
	for _, o := range metrics.WaveOutcomes {
		if got := testutil.ToFloat64(m.FirstWave.WithLabelValues(o)); got != want[o] {
			t.Errorf("fleetmirror_first_wave_blobs_total{outcome=%q} = %v, want %v", o, got, want[o])
		}
	}
}

// recordingHolds is a Holder that records what it was asked to hold.
type recordingHolds struct{ recorded }

func (h *recordingHolds) Hold(d string)         { h.add(d) }
func (h *recordingHolds) Holding(d string) bool { return h.has(d) }

// A blob containerd asks for while it writes it (its ingest is open) is
// advertised in flight, even when no peer has it and containerd goes
// upstream; a request for a blob containerd is not writing (not a pull)
// advertises nothing.
func TestHoldsOnlyWhatContainerdWrites(t *testing.T) {
	dir := t.TempDir()
	writing, other := digest.FromString("layer being pulled"), digest.FromString("no ingest")
	writeIngest(t, dir, "a", writing, agreeFrom, nil)
	rs := routing.NewMemory(netip.MustParseAddrPort("127.0.0.1:1"))
	f, err := fetch.New(rs[0], fetch.WithResolveTimeout(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	h := &recordingHolds{}
	reg, err := New(storetest.NewMemory(), WithFetcher(f), WithInFlight(store.NewInFlight(dir, time.Second), h))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	for _, d := range []digest.Digest{writing, other} {
		resp, _ := get(t, http.MethodGet, srv.URL+"/v2/team/app/blobs/"+d.String()+"?ns=example.com")
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s: status %d, want 404 (nobody holds it)", d, resp.StatusCode)
		}
	}
	if !h.Holding(writing.String()) {
		t.Error("the blob containerd is writing was not advertised in flight")
	}
	if h.Holding(other.String()) {
		t.Error("a blob containerd is not writing was advertised in flight")
	}
}

// A node that follows a fetcher that is gone sends its containerd upstream
// at once, and counts it: the first wave failing is visible in metrics.
func TestFollowingAGoneFetcher(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close() // nothing answers there
	rs := routing.NewMemory(gone, netip.MustParseAddrPort("127.0.0.1:2"))
	d := digest.FromString("a layer the gone node said it fetches")
	if err := rs[0].Claim(context.Background(), routing.Fetch, d.String()); err != nil {
		t.Fatal(err)
	}
	f, err := fetch.New(rs[1], fetch.WithResolveTimeout(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(func() int { return 0 })
	reg, err := New(storetest.NewMemory(), WithFetcher(f), WithClaims(claim.New(rs[1], 20*time.Millisecond, nil)), WithMetrics(m))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	start := time.Now()
	resp, _ := get(t, http.MethodGet, srv.URL+"/v2/team/app/blobs/"+d.String()+"?ns=example.com")
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("status %d, want 404 (upstream)", resp.StatusCode)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the miss took %s: a fetcher that refuses must send containerd upstream at once", took)
	}
	wantWave(t, m, map[string]float64{metrics.WaveFollowFailed: 1})
}
