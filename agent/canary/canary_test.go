package canary

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetmirror/fleetmirror/agent/canary/canarystatus"
	"github.com/fleetmirror/fleetmirror/agent/hosts"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
)

func TestImage(t *testing.T) {
	a, err := newImage("0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newImage("fedcba9876543210")
	if a.layer.digest == b.layer.digest || a.manifest.digest == b.manifest.digest {
		t.Error("two nonces made the same image")
	}
	if a.ref() != "canary.fleetmirror.invalid/fleetmirror/canary:0123456789abcdef" {
		t.Errorf("ref %s", a.ref())
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(a.manifest.data, &m); err != nil {
		t.Fatal(err)
	}
	if m.Config.Digest != a.config.digest || len(m.Layers) != 1 || m.Layers[0].Digest != a.layer.digest || m.Layers[0].Size != int64(len(a.layer.data)) {
		t.Errorf("manifest %s does not name the config and layer", a.manifest.data)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(a.config.data, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != a.layer.digest {
		t.Errorf("config %s", a.config.data)
	}
	tr := tar.NewReader(bytes.NewReader(a.layer.data))
	h, err := tr.Next()
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(tr)
	if h.Name != "fleetmirror-canary" || !strings.Contains(string(body), "0123456789abcdef") {
		t.Errorf("layer holds %s: %q", h.Name, body)
	}
	total := len(a.manifest.data) + len(a.config.data) + len(a.layer.data)
	t.Logf("canary image: manifest %d, config %d, layer %d bytes, %d in all", len(a.manifest.data), len(a.config.data), len(a.layer.data), total)
	if total > 8<<10 {
		t.Errorf("canary image is %d bytes; it should stay tiny", total)
	}
}

func TestWrap(t *testing.T) {
	c := newTestCanary(t, &fakeNode{})
	im, _ := newImage("00000000000000aa")
	next := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) })
	h := c.Wrap(next)
	get := func(method, path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
		return rec
	}
	ns := "?ns=" + Registry
	manifest := "/v2/" + Repository + "/manifests/" + im.tag + ns
	if rec := get("GET", manifest); rec.Code != http.StatusNotFound {
		t.Errorf("no run: %d, want 404", rec.Code)
	}
	if rec := get("GET", "/v2/x/manifests/v1?ns=docker.io"); rec.Code != http.StatusTeapot {
		t.Errorf("another registry's request did not go on: %d", rec.Code)
	}
	s := &served{im: im}
	c.current.Store(s)
	if rec := get("HEAD", manifest); rec.Code != 200 || rec.Header().Get("Docker-Content-Digest") != im.manifest.digest.String() || rec.Body.Len() != 0 {
		t.Errorf("HEAD manifest: %d %v", rec.Code, rec.Header())
	}
	for _, b := range []blob{im.config, im.layer} {
		rec := get("GET", "/v2/"+Repository+"/blobs/"+b.digest.String()+ns)
		if rec.Code != 200 || digest.FromBytes(rec.Body.Bytes()) != b.digest || rec.Header().Get("Content-Type") != b.mediaType {
			t.Errorf("GET %s: %d", b.digest, rec.Code)
		}
	}
	if rec := get("GET", "/v2/"+Repository+"/manifests/"+im.manifest.digest.String()+ns); rec.Code != 200 {
		t.Errorf("manifest by digest: %d", rec.Code)
	}
	for _, p := range []string{"/v2/" + Repository + "/manifests/old" + ns, "/v2/other/manifests/" + im.tag + ns,
		"/v2/" + Repository + "/blobs/" + digest.FromString("x").String() + ns} {
		if rec := get("GET", p); rec.Code != 404 {
			t.Errorf("GET %s: %d, want 404", p, rec.Code)
		}
	}
	if rec := get("DELETE", manifest); rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: %d", rec.Code)
	}
	m, cf, l, n, bytes := s.counts()
	if m != 2 || cf != 1 || l != 1 || n != 4 {
		t.Errorf("counted manifest %d, config %d, layer %d, requests %d", m, cf, l, n)
	}
	if want := int64(len(im.manifest.data) + len(im.config.data) + len(im.layer.data)); bytes != want {
		t.Errorf("counted %d bytes, want %d (GETs only)", bytes, want)
	}
}

// fakeNode is a containerd that pulls over HTTP from the mirror target,
// as containerd does when it reads the canary's hosts.toml.
type fakeNode struct {
	target  string // mirror target containerd asks; "" bypasses the agent
	version string
	discard bool // discard_unpacked_layers
	sticky  bool // RemoveImage does not remove

	mu      sync.Mutex
	images  map[string][]digest.Digest          // ref -> content it holds
	content map[digest.Digest]map[string]string // digest -> labels
	active  atomic.Int32
	overlap atomic.Bool
	pulls   atomic.Int32
}

func (f *fakeNode) dial(context.Context) (Node, error) { return f, nil }
func (f *fakeNode) Close() error                       { return nil }
func (f *fakeNode) Version(context.Context) (string, error) {
	if f.version == "" {
		return "v2.4.2", nil
	}
	return f.version, nil
}

func (f *fakeNode) Pull(ctx context.Context, ref string) error {
	if f.active.Add(1) > 1 {
		f.overlap.Store(true)
	}
	defer f.active.Add(-1)
	f.pulls.Add(1)
	host, rest, _ := strings.Cut(ref, "/")
	repo, tag, _ := strings.Cut(rest, ":")
	if f.target == "" {
		return fmt.Errorf("rpc error: code = Unknown desc = failed to resolve image: dial tcp: lookup %s: no such host", host)
	}
	get := func(kind, ref string) ([]byte, error) {
		req, _ := http.NewRequestWithContext(ctx, "GET", f.target+"/v2/"+repo+"/"+kind+"/"+ref+"?ns="+host, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return nil, fmt.Errorf("%s %s: %s", kind, ref, resp.Status)
		}
		return io.ReadAll(resp.Body)
	}
	mb, err := get("manifests", tag)
	if err != nil {
		return err
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(mb, &m); err != nil {
		return err
	}
	held := []digest.Digest{digest.FromBytes(mb)}
	for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		if _, err := get("blobs", d.Digest.String()); err != nil {
			return err
		}
		held = append(held, d.Digest)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// As containerd: the manifest references config and layers by GC
	// labels, but not the layers when it discards them (the GC deletes
	// them later).
	f.images[ref] = held
	labels := map[string]string{"containerd.io/gc.ref.content.config": held[1].String()}
	if !f.discard {
		labels["containerd.io/gc.ref.content.l.0"] = held[2].String()
	}
	f.content[held[0]] = labels
	for _, d := range held[1:] {
		f.content[d] = map[string]string{}
	}
	return nil
}

func (f *fakeNode) Remove(_ context.Context, ref string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sticky {
		return nil
	}
	for _, d := range f.images[ref] {
		delete(f.content, d)
	}
	delete(f.images, ref)
	return nil
}

func (f *fakeNode) Images(context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for ref := range f.images {
		out = append(out, ref)
	}
	return out, nil
}

func (f *fakeNode) Content(_ context.Context, d digest.Digest) (map[string]string, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	labels, ok := f.content[d]
	return labels, ok, nil
}

func (f *fakeNode) DeleteContent(_ context.Context, d digest.Digest) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.content, d)
	return nil
}

const mirrored = "http://10.1.2.3:5000"

// newTestCanary returns a canary whose agent serves at an httptest server
// that f pulls from, with hosts.toml written under a temp certs.d.
func newTestCanary(t *testing.T, f *fakeNode, opts ...Option) *Canary {
	t.Helper()
	if f.images == nil {
		f.images, f.content = map[string][]digest.Digest{}, map[digest.Digest]map[string]string{}
	}
	var c *Canary
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.Wrap(http.NotFoundHandler()).ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	if f.target == "" {
		f.target = srv.URL
	} else if f.target == "bypass" {
		f.target = ""
	}
	cfg := hosts.Config{CertsDir: t.TempDir(), MirrorTargets: []string{srv.URL}, Registries: []string{mirrored}}
	if err := hosts.Write(cfg); err != nil {
		t.Fatal(err)
	}
	c, err := New(append([]Option{WithContainerd("unused"), WithHosts(cfg, true), WithMetrics(metrics.New(func() int { return 0 })),
		WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	c.dial = f.dial
	return c
}

func TestRun(t *testing.T) {
	closedPort := func() string {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		return "http://" + ln.Addr().String()
	}
	tests := []struct {
		name    string
		node    *fakeNode
		opts    []Option
		setup   func(t *testing.T, c *Canary)
		step    string
		reasons []string // substrings of the reason
	}{
		{name: "healthy"},
		{name: "config_path not read, 2.4", node: &fakeNode{target: "bypass"}, step: StepPull,
			reasons: []string{"did not ask this agent", `config_path = "`, `[plugins."io.containerd.cri.v1.images".registry]`, "transfer service", "no such host"}},
		{name: "config_path not read, 1.6", node: &fakeNode{target: "bypass", version: "1.6.20~ds1"}, step: StepPull,
			reasons: []string{`[plugins."io.containerd.grpc.v1.cri".registry]`}},
		{name: "config check names the setting", node: &fakeNode{target: "bypass"}, step: StepPull,
			opts:    []Option{WithConfigCheck(func() (bool, string) { return false, "config.toml lacks config_path" })},
			reasons: []string{"config.toml lacks config_path"}},
		{name: "mirror target unreachable", step: StepPull, reasons: []string{"cannot reach this agent at its mirror target", "--mirror-target"},
			setup: func(t *testing.T, c *Canary) {
				c.hostsCfg.MirrorTargets = []string{closedPort()}
				c.dial = (&fakeNode{target: "bypass", images: map[string][]digest.Digest{}}).dial
			}},
		{name: "discard_unpacked_layers", node: &fakeNode{discard: true}, step: StepContent,
			reasons: []string{"discard_unpacked_layers = true", `[plugins."io.containerd.cri.v1.images"]`}},
		{name: "discard_unpacked_layers, 1.6", node: &fakeNode{discard: true, version: "1.6.20"}, step: StepContent,
			reasons: []string{`[plugins."io.containerd.grpc.v1.cri".containerd]`}},
		{name: "mirrored hosts.toml deleted, agent writes them", step: StepMirroredHosts,
			reasons: []string{"10.1.2.3:5000/hosts.toml is missing", "restart it"},
			setup: func(t *testing.T, c *Canary) {
				os.Remove(filepath.Join(c.hostsCfg.CertsDir, "10.1.2.3:5000", hosts.FileName))
			}},
		{name: "mirrored hosts.toml deleted, node writes them", step: StepMirroredHosts,
			reasons: []string{"10.1.2.3:5000/hosts.toml is missing", "`agent hosts`"},
			setup: func(t *testing.T, c *Canary) {
				c.mirrorAdd = false
				os.Remove(filepath.Join(c.hostsCfg.CertsDir, "10.1.2.3:5000", hosts.FileName))
			}},
		{name: "image not removed", node: &fakeNode{sticky: true}, step: StepCleanup, reasons: []string{"still listed after CRI RemoveImage"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.node
			if f == nil {
				f = &fakeNode{}
			}
			c := newTestCanary(t, f, tt.opts...)
			if tt.setup != nil {
				tt.setup(t, c)
			}
			if err := c.Ready(); err == nil || !strings.Contains(err.Error(), "not proven yet") {
				t.Errorf("Ready before a run: %v", err)
			}
			st := c.RunOnce(t.Context())
			t.Logf("status: %+v", st)
			if st.Step != tt.step || st.OK != (tt.step == "") {
				t.Fatalf("step %q ok %v, want step %q; reason: %s", st.Step, st.OK, tt.step, st.Reason)
			}
			for _, r := range tt.reasons {
				if !strings.Contains(st.Reason, r) {
					t.Errorf("reason %q\nlacks %q", st.Reason, r)
				}
			}
			want := 0.0
			result := tt.step
			if st.OK {
				want, result = 1, canarystatus.OK
				if st.Requests != 3 || st.Bytes == 0 || c.Ready() != nil {
					t.Errorf("healthy run: %d requests, %d bytes, ready %v", st.Requests, st.Bytes, c.Ready())
				}
			} else if err := c.Ready(); err == nil || !strings.Contains(err.Error(), st.Reason) {
				t.Errorf("Ready after a failed run: %v", err)
			}
			if got := testutil.ToFloat64(c.metrics.CanaryOK); got != want {
				t.Errorf("fleetmirror_canary_ok %v, want %v", got, want)
			}
			if got := testutil.ToFloat64(c.metrics.CanaryRuns.WithLabelValues(result)); got != 1 {
				t.Errorf("runs_total{result=%q} %v", result, got)
			}
			// Nothing of the canary is left, whatever failed (unless
			// removal itself failed).
			if !f.sticky && (len(f.images) > 0 || len(f.content) > 0) {
				t.Errorf("left behind: images %v, content %v", f.images, f.content)
			}
			if _, err := os.Stat(filepath.Join(c.hostsCfg.CertsDir, Registry, hosts.FileName)); err != nil {
				t.Errorf("canary hosts.toml: %v", err)
			}
		})
	}
}

// A broken path turns the verdict false; fixed, the next run turns it
// true again. Leftovers of a killed agent are removed first.
func TestRecovers(t *testing.T) {
	f := &fakeNode{discard: true}
	c := newTestCanary(t, f)
	f.images[Registry+"/"+Repository+":killed"] = nil
	if st := c.RunOnce(t.Context()); st.Verdict != canarystatus.Failed || st.Step != StepContent {
		t.Fatalf("%+v", st)
	}
	if len(f.images) != 0 {
		t.Errorf("leftover image not removed: %v", f.images)
	}
	f.discard = false
	st := c.RunOnce(t.Context())
	if !st.OK || st.Runs != 2 || st.LastOK == nil || st.Step != "" || st.Reason != "" {
		t.Fatalf("%+v", st)
	}
	rec := httptest.NewRecorder()
	c.StatusHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/canary", nil))
	var got map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"verdict", "ok", "lastRun", "lastOK", "durationSeconds", "requests", "bytes", "image", "containerd", "interval", "runs"} {
		if _, ok := got[k]; !ok {
			t.Errorf("/canary lacks %q: %s", k, rec.Body)
		}
	}
}

// Run runs on each trigger and each interval, one run at a time.
func TestRunLoop(t *testing.T) {
	f := &fakeNode{}
	c := newTestCanary(t, f, WithInterval(50*time.Millisecond))
	trigger := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { c.Run(ctx, trigger); close(done) }()
	trigger <- struct{}{}
	deadline := time.Now().Add(5 * time.Second)
	for f.pulls.Load() < 4 && time.Now().Before(deadline) {
		select {
		case trigger <- struct{}{}:
		default:
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	if n := f.pulls.Load(); n < 4 {
		t.Errorf("%d runs in 5s", n)
	}
	if f.overlap.Load() {
		t.Error("two runs overlapped")
	}
	if !c.Status().OK {
		t.Errorf("%+v", c.Status())
	}
}

func TestNewNeeds(t *testing.T) {
	cfg := hosts.Config{CertsDir: "/x", MirrorTargets: []string{"http://127.0.0.1:30120"}}
	for _, opts := range [][]Option{
		{WithHosts(cfg, true)},
		{WithContainerd("/s")},
		{WithContainerd("/s"), WithHosts(cfg, true), WithInterval(0)},
	} {
		if _, err := New(opts...); err == nil {
			t.Errorf("New(%d options) succeeded", len(opts))
		}
	}
	if _, err := New(WithContainerd("/s"), WithHosts(cfg, true)); err != nil {
		t.Error(err)
	}
}

func TestVersions(t *testing.T) {
	for v, want := range map[string][2]int{"v2.4.2": {2, 4}, "1.6.20~ds1": {1, 6}, "2.1.0-rc.1": {2, 1}, "": {0, 0}} {
		if ma, mi := parseVersion(v); ma != want[0] || mi != want[1] {
			t.Errorf("parseVersion(%q) = %d.%d", v, ma, mi)
		}
	}
	if readsHostPortDirs("1.6.20") || !readsHostPortDirs("1.7.0") || !readsHostPortDirs("v2.0.0") {
		t.Error("readsHostPortDirs")
	}
}
