package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/web"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// durationRe is what Last Mirror Success shows once a peer has served.
var durationRe = regexp.MustCompile(`^(\d+h)?(\d+m)?\d+s$`)

// TestDebugWeb runs the debug page of real agents on two containerd 2.x
// nodes: the stats and Measure Image Pull handlers, the metrics lint over a
// live /metrics, and the page itself in headless Chromium.
func TestDebugWeb(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the e2e suite needs root for network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := startCluster(t, ctx, cluster.Options{Nodes: 2, Containerd: cluster.Containerd2, AgentBin: agentBin(t), Logf: t.Logf})
	e := &env{t: t, ctx: ctx, c: c}
	n1, n2 := c.Node(1), c.Node(2)
	shared := e.image(21, 12<<20, 3, "web/shared:v1")
	peerOnly := e.image(22, 6<<20, 2, "web/peer-only:v1")

	t.Run("metrics pass promlint", func(t *testing.T) { lintMetrics(t, e, n1) })
	t.Run("stats before any peer pull", func(t *testing.T) {
		// Agents that start together may serve alone for a bootstrap round
		// or two before they join: give the page that long to list n1.
		s := stats(t, e, n2)
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); s = stats(t, e, n2) {
			if slices.ContainsFunc(s.Peers, func(p web.Peer) bool { return p.Address == n1.RegistryAddr() }) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if s.LastMirrorSuccess != web.Pending {
			t.Errorf("Last Mirror Success = %q before any peer pull, want %q", s.LastMirrorSuccess, web.Pending)
		}
		if !slices.ContainsFunc(s.Peers, func(p web.Peer) bool { return p.Address == n1.RegistryAddr() }) {
			t.Errorf("peers = %+v, want %s listed", s.Peers, n1.RegistryAddr())
		}
		if !slices.Contains(s.Config.MirroredRegistries, c.Upstream.Host()) || s.Config.ResolveTimeout != "20ms" {
			t.Errorf("config = %+v", s.Config)
		}
		if s.Prep.Configured || s.Prep.Detail != "not configured" {
			t.Errorf("prep = %+v, want not configured", s.Prep)
		}
	})

	// Node 1 pulls both images from upstream; node 2 pulls one from node 1.
	e.pull(t, n1, shared.ref, shared)
	e.pull(t, n1, peerOnly.ref, peerOnly)
	e.waitAdvertised(t, n1, shared)
	e.pull(t, n2, shared.ref, shared)
	e.waitAdvertised(t, n2, shared)

	t.Run("stats after a peer pull", func(t *testing.T) {
		s := stats(t, e, n2)
		if !durationRe.MatchString(s.LastMirrorSuccess) {
			t.Errorf("Last Mirror Success = %q, want a duration like 2m30s", s.LastMirrorSuccess)
		}
		if s.Requests.Peer < int64(len(shared.Layers)) || s.Requests.PeerHitRatio <= 0 {
			t.Errorf("requests = %+v, want at least %d from peers", s.Requests, len(shared.Layers))
		}
		var size int64
		for _, l := range shared.Layers {
			size += l.Size
		}
		if s.Bytes.FromPeers < size || s.Bytes.UpstreamSaved != s.Bytes.FromPeers {
			t.Errorf("bytes = %+v, want at least %d from peers", s.Bytes, size)
		}
		tagKey := oci.TagKey(c.Upstream.Host(), "web/shared", "v1")
		if !slices.Contains(s.Advertised.TagKeys, tagKey) || s.Advertised.Digests < len(shared.Digests()) {
			t.Errorf("advertised = %+v, want %s and its %d digests", s.Advertised, tagKey, len(shared.Digests()))
		}
		if s1 := stats(t, e, n1); s1.Bytes.ServedToPeers < size {
			t.Errorf("node 1 served %d bytes to peers, want at least %d", s1.Bytes.ServedToPeers, size)
		}
	})

	t.Run("measure an image only a peer holds", func(t *testing.T) {
		c.Upstream.Reset()
		m := measure(t, e, n2, peerOnly.ref)
		checkPeerMeasurement(t, m, n1, peerOnly)
		if got := upstreamRequests(c.Upstream.Stats(), n2); got != 0 {
			t.Errorf("measure sent %d requests upstream", got)
		}
		// Measured, not pulled: containerd on node 2 has none of it.
		if _, found, err := n2.ImageStatus(e.ctx, peerOnly.ref); err != nil || found {
			t.Errorf("node 2 has the measured image (found %v, %v)", found, err)
		}
		for _, d := range peerOnly.LayerDigests() {
			if n2.HasBlob(d) {
				t.Errorf("node 2's content store has measured layer %s", d)
			}
		}
	})

	t.Run("measure an image the node holds", func(t *testing.T) {
		m := measure(t, e, n2, shared.ref)
		if !m.Lookup.Local || m.Pull.Error != "" {
			t.Fatalf("lookup %+v, pull error %q", m.Lookup, m.Pull.Error)
		}
		for _, b := range m.Pull.Blobs {
			if b.Source != "local" {
				t.Errorf("%s %s came from %s on the node that holds it", b.Kind, b.Digest, b.Source)
			}
		}
	})

	t.Run("measure an image no node holds", func(t *testing.T) {
		m := measure(t, e, n2, c.Upstream.Ref("web/nowhere:v1"))
		if len(m.Lookup.Peers) != 0 || !strings.Contains(m.Pull.Error, "no node of this cluster holds it") {
			t.Errorf("lookup %+v, pull error %q", m.Lookup, m.Pull.Error)
		}
	})

	t.Run("a cross-site measure is refused", func(t *testing.T) {
		req, _ := http.NewRequestWithContext(e.ctx, http.MethodPost, debugURL(n2, "measure"),
			strings.NewReader(url.Values{"image": {shared.ref}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Sec-Fetch-Site", "cross-site")
		req.Header.Set("Origin", "https://elsewhere.example")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("cross-site POST: %s %s, want 403", resp.Status, b)
		}
		// The page has its own listener: the metrics port no longer serves it.
		resp, err = http.Get("http://" + netip.AddrPortFrom(n2.IP, cluster.AgentMetricsPort).String() + web.Path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("the metrics port answers %s for %s, want 404", resp.Status, web.Path)
		}
	})

	t.Run("page in a browser", func(t *testing.T) { browse(t, e, n1, n2, peerOnly) })
}

// webStats and webMeasurement are the handlers' JSON as a client reads it.
type (
	webStats       = web.Stats
	webMeasurement = web.Measurement
)

func debugURL(n *cluster.Node, path string) string {
	return "http://" + netip.AddrPortFrom(n.IP, cluster.AgentDebugWebPort).String() + web.Path + path
}

func stats(t *testing.T, e *env, n *cluster.Node) webStats {
	t.Helper()
	var s webStats
	getJSON(t, e.ctx, http.MethodGet, debugURL(n, "stats"), nil, &s)
	return s
}

func measure(t *testing.T, e *env, n *cluster.Node, ref string) webMeasurement {
	t.Helper()
	var m webMeasurement
	getJSON(t, e.ctx, http.MethodPost, debugURL(n, "measure"), url.Values{"image": {ref}}, &m)
	t.Logf("%s measured %s: lookup %s (%d peers), pull %s, %s, %s", n.Name, ref, m.Lookup.Latency, len(m.Lookup.Peers),
		m.Pull.Duration, m.Pull.SizeText, m.Pull.Throughput)
	return m
}

func getJSON(t *testing.T, ctx context.Context, method, u string, form url.Values, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %s: %s", method, u, resp.Status, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s %s: %v in %s", method, u, err, b)
	}
}

// checkPeerMeasurement checks a measurement of img, which only node from holds.
func checkPeerMeasurement(t *testing.T, m webMeasurement, from *cluster.Node, img image) {
	t.Helper()
	if m.Pull.Error != "" {
		t.Fatalf("pull error: %s", m.Pull.Error)
	}
	if m.Lookup.Local || !slices.Contains(m.Lookup.Peers, from.RegistryAddr()) || m.Lookup.Latency == "" {
		t.Errorf("lookup = %+v, want %s found", m.Lookup, from.RegistryAddr())
	}
	var layers []string
	for _, b := range m.Pull.Blobs {
		if b.Source != "peer" {
			t.Errorf("%s %s came from %q, want a peer", b.Kind, b.Digest, b.Source)
		}
		if b.Kind != "layer" {
			continue
		}
		layers = append(layers, b.Digest)
		if !slices.Equal(b.Peers, []string{from.RegistryAddr()}) {
			t.Errorf("layer %s came from %v, want %s", b.Digest, b.Peers, from.RegistryAddr())
		}
	}
	var want []string
	for _, d := range img.LayerDigests() {
		want = append(want, d.String())
	}
	if !slices.Equal(layers, want) {
		t.Errorf("layer rows %v, want %v", layers, want)
	}
	if m.Pull.Size < img.Config.Size+img.Layers[0].Size {
		t.Errorf("pull size %d is less than the image", m.Pull.Size)
	}
}

func lintMetrics(t *testing.T, e *env, n *cluster.Node) {
	req, _ := http.NewRequestWithContext(e.ctx, http.MethodGet, n.MetricsURL(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	problems, err := promlint.New(resp.Body).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

// browse opens node 2's page in headless Chromium, checks Last Mirror
// Success, runs Measure Image Pull for img (held by node 1 only) and checks
// the layer rows, and saves a screenshot.
func browse(t *testing.T, e *env, n1, n2 *cluster.Node, img image) {
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed: run `make tools` (hack/tools.sh installs Debian's chromium)")
	}
	// Only the node's page may be reached: every name resolves to nothing,
	// and nothing runs in the background.
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(bin),
		chromedp.UserDataDir(profileDir(t)),
		chromedp.WindowSize(1366, 900),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-default-apps", true),
		chromedp.Flag("disable-domain-reliability", true),
		chromedp.Flag("disable-client-side-phishing-detection", true),
		chromedp.Flag("disable-features", "Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication"),
		chromedp.Flag("metrics-recording-only", true),
		chromedp.Flag("no-proxy-server", true),
		chromedp.Flag("password-store", "basic"),
		chromedp.Flag("host-resolver-rules", "MAP * ~NOTFOUND , EXCLUDE "+n2.IP.String()),
	}
	actx, cancel := chromedp.NewExecAllocator(e.ctx, opts...)
	defer cancel()
	bctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	defer cancel()
	bctx, cancel = context.WithTimeout(bctx, 2*time.Minute)
	defer cancel()

	page := debugURL(n2, "")
	var last string
	if err := chromedp.Run(bctx,
		chromedp.Navigate(page),
		chromedp.WaitVisible("#last-mirror-success", chromedp.ByID),
		chromedp.Text("#last-mirror-success", &last, chromedp.ByID),
	); err != nil {
		t.Fatalf("opening %s: %v", page, err)
	}
	if !durationRe.MatchString(last) {
		t.Errorf("Last Mirror Success shows %q, want a duration like 2m30s", last)
	}

	// The stats refresh without a reload: the "updated" clock moves.
	var before, after string
	if err := chromedp.Run(bctx,
		chromedp.Text("#updated", &before, chromedp.ByID),
		chromedp.Sleep(4500*time.Millisecond),
		chromedp.Text("#updated", &after, chromedp.ByID),
	); err != nil {
		t.Fatal(err)
	}
	if before == after {
		t.Errorf("the page did not refresh its stats: updated %s both times", before)
	}
	var peers string
	if err := chromedp.Run(bctx, chromedp.Text("#peers", &peers, chromedp.ByID)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(peers, n1.RegistryAddr()) {
		t.Errorf("the refreshed page lists peers %q, want %s", peers, n1.RegistryAddr())
	}

	layerRows := `#pull-blobs tr[data-kind="layer"]`
	var rows []string
	if err := chromedp.Run(bctx,
		chromedp.SendKeys("#measure-image", img.ref, chromedp.ByID),
		chromedp.Click("#measure-pull", chromedp.ByID),
		chromedp.WaitVisible("#measure-result", chromedp.ByID),
		chromedp.Evaluate(fmt.Sprintf(`Array.from(document.querySelectorAll(%q)).map(r => r.innerText)`, layerRows), &rows),
	); err != nil {
		t.Fatalf("Measure Image Pull: %v", err)
	}
	if len(rows) != len(img.Layers) {
		t.Errorf("%d layer rows, want %d: %q", len(rows), len(img.Layers), rows)
	}
	for i, r := range rows {
		if i < len(img.Layers) && !strings.Contains(r, img.Layers[i].Digest.String()) {
			t.Errorf("row %d %q lacks layer %s", i, r, img.Layers[i].Digest)
		}
		if !strings.Contains(r, "peer "+n1.RegistryAddr()) || !strings.Contains(r, "/s") {
			t.Errorf("row %d %q does not show source peer %s and a throughput", i, r, n1.RegistryAddr())
		}
	}
	var lookupPeers string
	if err := chromedp.Run(bctx, chromedp.Text("#lookup-peers", &lookupPeers, chromedp.ByID)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(lookupPeers, n1.RegistryAddr()) {
		t.Errorf("Lookup Result shows peers %q, want %s", lookupPeers, n1.RegistryAddr())
	}

	var shot []byte
	if err := chromedp.Run(bctx, chromedp.FullScreenshot(&shot, 100)); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.ArtifactDir(), "debug-web.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of %s: %s", page, path)
}

// profileDir is a fresh Chromium profile. Not t.TempDir: Chromium's helper
// processes can still write into it for a moment after the browser exits,
// which fails TempDir's cleanup; so removal is retried briefly here.
func profileDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "fleetmirror-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for range 50 {
			if os.RemoveAll(dir) == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("could not remove the Chromium profile %s", dir)
	})
	return dir
}
