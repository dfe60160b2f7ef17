package cluster

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and containerd")
	}
}

// requireContainerd fails the test when containerd version is missing: a
// broken tools cache must turn the suite red, not into skips.
// `bash hack/tools.sh` (`make tools`, which `make unit` and `make e2e` run
// first) installs both versions.
func requireContainerd(t *testing.T, version string) {
	t.Helper()
	if _, err := ContainerdBinary(version); err != nil {
		t.Fatalf("%v; install the test tools with `bash hack/tools.sh` (make tools)", err)
	}
}

// logger sends harness logs to the test log and keeps them for inspection.
type logger struct {
	t  *testing.T
	mu sync.Mutex
	b  strings.Builder
}

func (l *logger) logf(format string, args ...any) {
	l.t.Helper()
	l.t.Logf(format, args...)
	l.mu.Lock()
	fmt.Fprintf(&l.b, format+"\n", args...)
	l.mu.Unlock()
}

// runObjects lists namespaces and links of run id still on the machine.
func runObjects(t *testing.T, id string) []string {
	t.Helper()
	var left []string
	for _, args := range [][]string{{"netns", "list"}, {"-o", "link", "show"}} {
		out, err := exec.Command("ip", args...).Output()
		if err != nil {
			t.Fatalf("ip %v: %v", args, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, namePrefix+id+"-") {
				left = append(left, strings.TrimSpace(line))
			}
		}
	}
	return left
}

func assertGone(t *testing.T, id string, pids []int, paths ...string) {
	t.Helper()
	if left := runObjects(t, id); len(left) > 0 {
		t.Errorf("after Close, still there:\n%s", strings.Join(left, "\n"))
	}
	for _, pid := range pids {
		if pid > 0 && syscall.Kill(pid, 0) == nil {
			t.Errorf("after Close, pid %d still runs", pid)
		}
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("after Close, %s still exists", p)
		}
	}
	if _, err := os.Stat(stateFile(id)); err == nil {
		t.Errorf("after Close, state file %s still exists", stateFile(id))
	}
}

func TestImageDeterministic(t *testing.T) {
	a, err := GenerateImage(7, 1<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	b, err := GenerateImage(7, 1<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	c, err := GenerateImage(8, 1<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	if a.Manifest != b.Manifest || fmt.Sprint(a.Layers) != fmt.Sprint(b.Layers) {
		t.Errorf("same seed, different image: %v vs %v", a.Blobs(), b.Blobs())
	}
	if a.Manifest.Digest == c.Manifest.Digest || a.Layers[0].Digest == c.Layers[0].Digest {
		t.Errorf("different seeds, same digests")
	}
	var total int64
	for _, l := range a.Layers {
		if l.MediaType != "application/vnd.oci.image.layer.v1.tar" {
			t.Errorf("layer media type %s", l.MediaType)
		}
		total += l.Size
	}
	if total < 1<<20 || total > 1<<20+3*4096 {
		t.Errorf("layers total %d bytes, want about 1 MiB", total)
	}
}

func TestRequestKind(t *testing.T) {
	for path, want := range map[string]string{
		"/v2/":                                 "other",
		"/v2/a/b/manifests/v1":                 "manifest",
		"/v2/a/blobs/sha256:00":                "blob",
		"/v2/a/blobs/uploads/":                 "upload",
		"/v2/a/blobs/uploads/123":              "upload",
		"/v2/manifests/blobs/sha256:ab":        "blob",
		"/v2/blobs/x/manifests/sha256:abcdef0": "manifest",
	} {
		if got, _ := requestKind(path); got != want {
			t.Errorf("requestKind(%q) = %q, want %q", path, got, want)
		}
	}
}

func TestRequestRepository(t *testing.T) {
	for path, want := range map[string]string{
		"/v2/":                          "",
		"/v2/a/b/manifests/v1":          "a/b",
		"/v2/a/blobs/uploads/123":       "a",
		"/v2/manifests/blobs/sha256:ab": "manifests",
		"/other":                        "",
	} {
		if got := requestRepository(path); got != want {
			t.Errorf("requestRepository(%q) = %q, want %q", path, got, want)
		}
	}
}

// TestPullThroughCRI runs the pull path without agents on both containerd
// versions at once (which also checks that two runs can overlap).
func TestPullThroughCRI(t *testing.T) {
	requireRoot(t)
	for _, version := range []string{Containerd2, Containerd16} {
		t.Run("containerd-"+version, func(t *testing.T) {
			requireContainerd(t, version)
			t.Parallel()
			testPull(t, version)
		})
	}
}

func testPull(t *testing.T, version string) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	l := &logger{t: t}
	c, err := Start(ctx, Options{Nodes: 2, Containerd: version, Logf: l.logf})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			c.Close()
		}
	}()
	defer func() {
		if t.Failed() && !closed {
			t.Log(c.LogTail(30))
		}
	}()
	n1, n2 := c.Node(1), c.Node(2)

	img, err := GenerateImage(1, 5<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref := c.Upstream.Ref("test/img:v1")
	if err := c.Upstream.Push(ctx, ref, img.Image); err != nil {
		t.Fatal(err)
	}
	c.Upstream.Reset()

	d, err := n1.Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd %s: pulled 5 MiB in %v", version, d)
	st := c.Upstream.Stats()
	for _, l := range img.Layers {
		if got := st.BlobGets[l.Digest.String()]; got != 1 {
			t.Errorf("upstream served layer %s %d times, want 1", l.Digest, got)
		}
	}
	if got := st.FromClient(n1.IP, "GET", "blob").Bytes; got < 5<<20 {
		t.Errorf("upstream sent node 1 %d blob bytes, want >= 5 MiB (stats %+v)", got, st)
	}
	if got := st.FromClient(n2.IP, "GET", "blob").Requests; got != 0 {
		t.Errorf("node 2 fetched %d blobs without pulling", got)
	}
	if err := n1.VerifyContent(ctx, img.Digests()); err != nil {
		t.Error(err)
	}
	if got, err := n1.ImageDigest(ctx, ref); err != nil || got != img.Manifest.Digest {
		t.Errorf("CRI image digest %s, %v; want %s", got, err, img.Manifest.Digest)
	}
	if n2.HasBlob(img.Layers[0].Digest) {
		t.Errorf("node 2 has a layer it never pulled")
	}

	// A mirror that is down (connection refused on the node's loopback)
	// must not break pulls: containerd falls back to the next host.
	dead := fmt.Sprintf("server = %q\n\n[host.\"http://127.0.0.1:%d\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
		c.Upstream.URL(), AgentRegistryPort)
	if err := n2.WriteHostsTOML(c.Upstream.Host(), dead); err != nil {
		t.Fatal(err)
	}
	if _, err := n2.Pull(ctx, ref); err != nil {
		t.Fatalf("pull with a dead mirror configured: %v", err)
	}
	if got := c.Upstream.Stats().FromClient(n2.IP, "GET", "blob").Bytes; got < 5<<20 {
		t.Errorf("upstream sent node 2 %d blob bytes after fallback, want >= 5 MiB", got)
	}
	if err := n2.VerifyContent(ctx, img.Digests()); err != nil {
		t.Error(err)
	}

	// The same registry under a second name on the node's loopback: no
	// hosts.toml, plain HTTP by containerd's localhost default, counted as
	// the node's own requests.
	c.Upstream.Reset()
	if _, err := n1.Pull(ctx, c.Upstream.AltHost()+"/test/img:v1"); err != nil {
		t.Errorf("pull from AltHost: %v", err)
	}
	// Node 1 holds the content already, so containerd only resolves the tag:
	// one HEAD, no GET.
	if got := c.Upstream.Stats().FromClient(n1.IP, "HEAD", "manifest").Requests; got == 0 {
		t.Errorf("AltHost pull not counted as node 1's: %+v", c.Upstream.Stats())
	}

	if err := n1.RemoveImage(ctx, ref); err != nil {
		t.Error(err)
	}
	if _, found, err := n1.ImageStatus(ctx, ref); err != nil || found {
		t.Errorf("after RemoveImage: found %v, %v", found, err)
	}

	// With the upstream down pulls fail (connection refused); it comes back
	// with its images.
	if err := c.Upstream.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := n1.Pull(ctx, ref); err == nil {
		t.Errorf("pull with the upstream stopped succeeded")
	}
	if err := c.Upstream.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := n1.Pull(ctx, ref); err != nil {
		t.Errorf("pull after the upstream restarted: %v", err)
	}

	// Restarting containerd keeps the content and CRI answers again.
	if err := n2.RestartContainerd(ctx); err != nil {
		t.Fatal(err)
	}
	if _, found, err := n2.ImageStatus(ctx, ref); err != nil || !found {
		t.Errorf("after restart: found %v, %v", found, err)
	}

	id := c.ID
	pids := []int{n1.ContainerdPID(), n2.ContainerdPID()}
	paths := []string{c.Dir, c.sockDir}
	closed = true
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	assertGone(t, id, pids, paths...)
}

// TestStartFailureCleansUp makes the agent fail at start (it is /bin/false)
// and checks that Start removes all it had made.
func TestStartFailureCleansUp(t *testing.T) {
	requireRoot(t)
	requireContainerd(t, Containerd16)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l := &logger{t: t}
	c, err := Start(ctx, Options{Nodes: 2, Containerd: Containerd16, AgentBin: "/bin/false", Logf: l.logf})
	if err == nil {
		c.Close()
		t.Fatal("Start with a failing agent succeeded")
	}
	t.Logf("Start failed as wanted: %v", err)
	m := regexp.MustCompile(`cluster ([0-9a-f]{6}): subnet .* dir (\S+)`).FindStringSubmatch(l.b.String())
	if m == nil {
		t.Fatalf("Start failed before making anything; want a failure after the network exists")
	}
	assertGone(t, m[1], nil, m[2], "/run/fm-"+m[1])
}

// TestShaping checks that UpstreamRate and UpstreamLatency slow the
// upstream down as configured, and that ShapeEgress limits a node's link.
func TestShaping(t *testing.T) {
	requireRoot(t)
	requireContainerd(t, Containerd2)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const rate = 4 << 20
	l := &logger{t: t}
	c, err := Start(ctx, Options{Nodes: 1, Logf: l.logf, UpstreamRate: rate, UpstreamLatency: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	img, err := GenerateImage(2, 2<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	ref := c.Upstream.Ref("shaped/img:v1")
	if err := c.Upstream.Push(ctx, ref, img.Image); err != nil {
		t.Fatal(err)
	}
	d, err := c.Node(1).Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	// 2 MiB at 4 MiB/s is 0.5 s minus one burst (rate/20), plus latency.
	if want := 400 * time.Millisecond; d < want {
		t.Errorf("shaped pull of 2 MiB took %v, want >= %v", d, want)
	}
	if d > 5*time.Second {
		t.Errorf("shaped pull of 2 MiB took %v, far slower than 4 MiB/s", d)
	}
	t.Logf("2 MiB at %d B/s + 50ms/request: %v", rate, d)

	// ShapeEgress: 2 MiB from a server in the node's namespace at 4 MiB/s.
	n := c.Node(1)
	ln, err := listenInNetns(nsPath(n.NS), "tcp", netip.AddrPortFrom(n.IP, 8080).String())
	if err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 2<<20)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(payload) })}
	go srv.Serve(ln)
	defer srv.Close()
	url := "http://" + ln.Addr().String() + "/"
	fast, status := TimeGet(ctx, url)
	if status != 200 {
		t.Fatalf("GET %s: status %d", url, status)
	}
	if err := n.ShapeEgress(ctx, rate); err != nil {
		t.Fatal(err)
	}
	slow, _ := TimeGet(ctx, url)
	if err := n.ShapeEgress(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.ShapeEgress(ctx, 0); err != nil {
		t.Errorf("removing no limit: %v", err)
	}
	again, _ := TimeGet(ctx, url)
	t.Logf("2 MiB from the node: %v unshaped, %v at %d B/s, %v after removing the limit", fast, slow, rate, again)
	if slow < 300*time.Millisecond || slow < 3*fast {
		t.Errorf("egress shaping had no effect: %v shaped vs %v", slow, fast)
	}
	if again > slow/2 {
		t.Errorf("limit not removed: %v", again)
	}
}

// TestLeftoversOfCrashedRun starts a cluster in a child process, kills the
// child with SIGKILL (no Close runs) and checks that CleanupLeftovers, which
// every Start calls, removes what the dead run left.
func TestLeftoversOfCrashedRun(t *testing.T) {
	requireRoot(t)
	if os.Getenv("FM_CRASH_HELPER") == "1" {
		c, err := Start(context.Background(), Options{Nodes: 1, Containerd: Containerd16})
		if err != nil {
			fmt.Println("START-ERROR", err)
			os.Exit(1)
		}
		AnnounceRunAndWait(c.ID, c.Dir)
	}
	requireContainerd(t, Containerd16)
	id, dir := CrashChild(t, "TestLeftoversOfCrashedRun", []string{"FM_CRASH_HELPER=1"}, 30*time.Second)
	if len(runObjects(t, id)) == 0 {
		t.Fatalf("the crashed run left nothing to clean up; the test proves nothing")
	}
	l := &logger{t: t}
	CleanupLeftovers(context.Background(), l.logf)
	assertGone(t, id, nil, dir, "/run/fm-"+id)
}

// TestAgentLifecycle checks the agent plumbing (flags, readiness, stop and
// kill) when FLEETMIRROR_AGENT names a built agent; the pull-path
// assertions live in test/e2e.
func TestAgentLifecycle(t *testing.T) {
	requireRoot(t)
	bin := os.Getenv("FLEETMIRROR_AGENT")
	if bin == "" {
		t.Skip("FLEETMIRROR_AGENT is not set")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	l := &logger{t: t}
	c, err := Start(ctx, Options{Nodes: 2, AgentBin: bin, Logf: l.logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	defer func() {
		if t.Failed() {
			t.Log(c.LogTail(30))
		}
	}()
	n1, n2 := c.Node(1), c.Node(2)
	img, err := GenerateImage(5, 4<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref := c.Upstream.Ref("agent/img:v1")
	if err := c.Upstream.Push(ctx, ref, img.Image); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		if _, err := n.Pull(ctx, ref); err != nil {
			t.Fatal(err)
		}
		if err := n.VerifyContent(ctx, img.Digests()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := n1.Metrics(ctx); err != nil {
		t.Errorf("metrics: %v", err)
	}
	if n1.AgentPID() == 0 {
		t.Fatal("no agent pid")
	}
	if err := n1.KillAgent(); err != nil {
		t.Error(err)
	}
	if err := n2.StopAgent(); err != nil {
		t.Error(err)
	}
	if n1.AgentPID() != 0 || n2.AgentPID() != 0 {
		t.Error("agents still running")
	}
	// Together: an agent is ready only once it has a peer.
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
}
