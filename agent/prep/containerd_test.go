package prep_test

import (
	"context"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	digest "github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/fleetmirror/fleetmirror/agent/prep"
	"github.com/fleetmirror/fleetmirror/agent/systemd"
	"github.com/fleetmirror/fleetmirror/agent/systemd/systemdtest"
	"github.com/fleetmirror/fleetmirror/test/cluster/containerdconfig"
)

// nodeConfig is a test config for containerd major version major in
// dir: containerdconfig's (its own root, state and sockets, and no plugin
// that cannot run here) with plugins, the CRI tables of the test.
func nodeConfig(version, major int, plugins string) func(dir string) string {
	return func(dir string) string {
		return containerdconfig.Config{Version: version, Major: major, NoImports: true,
			Root: dir + "/root", State: dir + "/state", Socket: dir + "/c.sock", Opt: dir + "/opt",
			Plugins: strings.ReplaceAll(plugins, "%[1]s", dir)}.String()
	}
}

// Configs "without these settings": no registry config_path anywhere and
// discard_unpacked_layers = true (what EKS ships), so a CRI pull neither
// asks a mirror nor keeps its layers until prep has run. Each containerd
// has its own root, state and sockets; plugins that cannot run here are
// disabled (as in test/cluster). 2.x's transfer service unpacks only for
// its configured snapshotter, overlayfs.
var config2x = nodeConfig(3, 2, `  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
    discard_unpacked_layers = true

  [plugins."io.containerd.cri.v1.runtime"]
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["%[1]s/cni-bin"]
      conf_dir = "%[1]s/cni-conf"

  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
`)

var config16 = nodeConfig(2, 1, criV1Tables("native"))

// config2xV2 is a version 2 file on containerd 2.x, which migrates it on
// load: what prep writes for an empty config.toml (version 2 with the
// 1.x tables) must take effect there too.
var config2xV2 = nodeConfig(2, 2, criV1Tables("overlayfs"))

// criV1Tables are the CRI tables of a version 2 config without the
// settings, with snapshotter.
func criV1Tables(snapshotter string) string {
	return `  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "` + snapshotter + `"
      discard_unpacked_layers = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "%[1]s/cni-bin"
      conf_dir = "%[1]s/cni-conf"
`
}

// unit is a containerd run the way systemd would run containerd.service:
// restart stops it and starts it again from the same config.
type unit struct {
	bin, dir string

	mu  sync.Mutex
	cmd *exec.Cmd
}

func (u *unit) start() error {
	log, err := os.OpenFile(filepath.Join(u.dir, "containerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(u.bin, "--config", filepath.Join(u.dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	u.mu.Lock()
	u.cmd = cmd
	u.mu.Unlock()
	return nil
}

func (u *unit) stop() {
	u.mu.Lock()
	cmd := u.cmd
	u.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// restart is what systemd's RestartUnit does for a simple service: stop,
// start, and report the job done without waiting for the socket.
func (u *unit) restart() error {
	u.stop()
	return u.start()
}

func (u *unit) pid() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.cmd.Process.Pid
}

func (u *unit) socket() string { return filepath.Join(u.dir, "c.sock") }

func (u *unit) logTail() string {
	b, _ := os.ReadFile(filepath.Join(u.dir, "containerd.log"))
	if len(b) > 6000 {
		b = b[len(b)-6000:]
	}
	return string(b)
}

// TestPrepRealContainerd: containerd 2.x and Debian's 1.6 start from a
// config without the settings; prep patches it and restarts containerd
// through systemd's D-Bus API (a stand-in Manager on a real dbus-daemon,
// see systemdtest) which restarts the real process. A CRI pull afterwards
// asks the hosts.toml mirror first and keeps its layers; a second prep run
// restarts nothing. The third case is a version 2 file on containerd 2.x
// whose config.toml is a symbolic link: prep patches the link's target,
// and containerd, started on the link, reads the patched file.
func TestPrepRealContainerd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root to run containerd")
	}
	v2 := os.Getenv("FLEETMIRROR_CONTAINERD2")
	if v2 == "" {
		v2 = "/var/cache/fleetmirror/tools/containerd-v2.4.2/bin/containerd"
	}
	for _, tc := range []struct {
		name, bin string
		config    func(dir string) string
		link      bool
	}{
		{"containerd-2", v2, config2x, false},
		{"containerd-1.6", "/usr/bin/containerd", config16, false},
		{"containerd-2-version-2-symlink", v2, config2xV2, true},
	} {
		t.Run(tc.name, func(t *testing.T) { testPrep(t, tc.bin, tc.config, tc.link) })
	}
}

func testPrep(t *testing.T, bin string, config func(dir string) string, link bool) {
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%v (run `make tools`)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Short path: unix sockets allow 108 bytes.
	dir, err := os.MkdirTemp("/tmp", "fmprep")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"cni-bin", "cni-conf", "certs.d"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	cfgPath := filepath.Join(dir, "config.toml")
	file := cfgPath
	if link {
		file = filepath.Join(dir, "real", "config.toml")
		os.MkdirAll(filepath.Dir(file), 0o755)
		if err := os.Symlink("real/config.toml", cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file, []byte(config(dir)), 0o644); err != nil {
		t.Fatal(err)
	}
	u := startUnit(t, ctx, bin, dir)

	mgr, sd := systemdFor(t, ctx, u)

	certs := filepath.Join(dir, "certs.d")
	cfg := prep.Config{Options: prep.Options{CertsDir: certs}, Path: cfgPath, HostRoot: dir,
		Unit: "containerd.service", Socket: u.socket(), RestartTimeout: time.Minute}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	pid0 := u.pid()
	plan, err := prep.Run(ctx, cfg, sd, log)
	if err != nil {
		t.Fatal(err)
	}
	if !plan.Changed || mgr.Restarts("containerd.service") != 1 || u.pid() == pid0 {
		t.Fatalf("first prep: changed=%v restarts=%d pid %d -> %d; want a change and one restart", plan.Changed, mgr.Restarts("containerd.service"), pid0, u.pid())
	}
	if fi, err := os.Lstat(cfgPath); err != nil || (fi.Mode()&os.ModeSymlink != 0) != link || plan.Path != file {
		t.Fatalf("after prep: %s link=%v (want %v), patched %s (want %s)", cfgPath, err == nil && fi.Mode()&os.ModeSymlink != 0, link, plan.Path, file)
	}
	// Run waited for the socket: containerd answers right away.
	cl, err := client.New(u.socket(), client.WithTimeout(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := cl.Version(ctx); err != nil {
		t.Fatalf("containerd not answering after prep returned: %v", err)
	}

	// An upstream registry and a mirror that records and answers 404, so
	// containerd falls back to the upstream.
	up := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	defer up.Close()
	var mirrored atomic.Int64
	mirror := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mirrored.Add(1)
		http.NotFound(w, r)
	}))
	defer mirror.Close()
	upHost := strings.TrimPrefix(up.URL, "http://")
	hostsDir := filepath.Join(certs, upHost)
	os.MkdirAll(hostsDir, 0o755)
	hostsToml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", up.URL, mirror.URL)
	if err := os.WriteFile(filepath.Join(hostsDir, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref := upHost + "/prep/test:v1"
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}

	conn, err := grpc.NewClient("unix://"+u.socket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := runtimeapi.NewImageServiceClient(conn).PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		t.Fatalf("CRI pull %s: %v", ref, err)
	}
	if mirrored.Load() == 0 {
		t.Fatal("the pull never asked the hosts.toml mirror: config_path not in effect")
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	// Give the garbage collector a moment: discarded layers go when it runs.
	time.Sleep(time.Second)
	kctx := namespaces.WithNamespace(ctx, "k8s.io")
	for _, l := range layers {
		d, _ := l.Digest()
		if _, err := cl.ContentStore().Info(kctx, digest.Digest(d.String())); err != nil {
			t.Errorf("layer %s not in the content store after the pull (discard_unpacked_layers not false?): %v", d, err)
		}
	}
	t.Logf("mirror saw %d requests; %d layers kept", mirrored.Load(), len(layers))

	// Second run: nothing to change, no restart.
	pid1 := u.pid()
	plan, err = prep.Run(ctx, cfg, sd, log)
	if err != nil {
		t.Fatal(err)
	}
	if plan.Changed || mgr.Restarts("containerd.service") != 1 || u.pid() != pid1 {
		t.Fatalf("second prep: changed=%v restarts=%d pid %d -> %d; want nothing", plan.Changed, mgr.Restarts("containerd.service"), pid1, u.pid())
	}
}

// systemdFor serves u as containerd.service on a private bus, as systemd
// would, and returns that manager and a client of it (closed at the end).
func systemdFor(t *testing.T, ctx context.Context, u *unit) (*systemdtest.Manager, *systemd.Client) {
	t.Helper()
	bus := systemdtest.StartBus(t)
	mgr := systemdtest.Serve(t, bus, map[string]func() error{"containerd.service": u.restart})
	sd, err := systemd.Dial(ctx, bus)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sd.Close() })
	return mgr, sd
}

// startUnit starts containerd from bin with dir's config.toml, stops it when
// the test ends (its log then shown if the test failed) and waits until it
// answers.
func startUnit(t *testing.T, ctx context.Context, bin, dir string) *unit {
	t.Helper()
	u := &unit{bin: bin, dir: dir}
	if err := u.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		u.stop()
		if t.Failed() {
			t.Logf("containerd log:\n%s", u.logTail())
		}
	})
	waitUp(t, ctx, u)
	return u
}

func waitUp(t *testing.T, ctx context.Context, u *unit) {
	t.Helper()
	for {
		cl, err := client.New(u.socket(), client.WithTimeout(time.Second))
		if err == nil {
			_, err = cl.Version(ctx)
			cl.Close()
			if err == nil {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("containerd did not come up: %v\n%s", err, u.logTail())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestMigrateMirrorsRealContainerd: containerd 1.6 and 2.x start from a
// config with an inline mirror for a registry (both on loopback: the
// registry answers 404 to everything, the mirror holds the image), and a
// CRI pull goes through the mirror. prep --migrate-mirrors moves the mirror
// into hosts.toml and restarts containerd, which must come up with its CRI
// plugin (it refuses mirrors beside config_path) and pull through the
// mirror named in the migrated hosts.toml; a second run restarts nothing.
func TestMigrateMirrorsRealContainerd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root to run containerd")
	}
	v2 := os.Getenv("FLEETMIRROR_CONTAINERD2")
	if v2 == "" {
		v2 = "/var/cache/fleetmirror/tools/containerd-v2.4.2/bin/containerd"
	}
	const v1Mirrors = `  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."%s"]
    endpoint = ["%s"]
`
	for _, tc := range []struct {
		name, bin string
		config    func(dir string) string
		mirrors   string
	}{
		{"containerd-1.6", "/usr/bin/containerd", config16, v1Mirrors},
		{"containerd-2-version-2", v2, config2xV2, v1Mirrors},
		{"containerd-2", v2, config2x, `  [plugins."io.containerd.cri.v1.images".registry.mirrors."%s"]
    endpoint = ["%s"]
`},
	} {
		t.Run(tc.name, func(t *testing.T) { testMigrate(t, tc.bin, tc.config, tc.mirrors) })
	}
}

// counting serves h and counts its requests.
func counting(h http.Handler) (*httptest.Server, *atomic.Int64) {
	var n atomic.Int64
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		h.ServeHTTP(w, r)
	})), &n
}

func testMigrate(t *testing.T, bin string, config func(dir string) string, mirrors string) {
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%v (run `make tools`)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	up, upHits := counting(http.NotFoundHandler())
	defer up.Close()
	mirror, mirrorHits := counting(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	defer mirror.Close()
	upHost := strings.TrimPrefix(up.URL, "http://")
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(strings.TrimPrefix(mirror.URL, "http://")+"/prep/test:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	pushHits := mirrorHits.Load()
	ref := upHost + "/prep/test:v1"

	dir, err := os.MkdirTemp("/tmp", "fmmig")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"cni-bin", "cni-conf"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	cfgPath := filepath.Join(dir, "config.toml")
	src := config(dir) + fmt.Sprintf(mirrors, upHost, mirror.URL)
	if err := os.WriteFile(cfgPath, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	u := startUnit(t, ctx, bin, dir)

	conn, err := grpc.NewClient("unix://"+u.socket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	images := runtimeapi.NewImageServiceClient(conn)
	pull := func(when string) {
		t.Helper()
		before := mirrorHits.Load()
		if _, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
			t.Fatalf("%s: CRI pull %s: %v", when, ref, err)
		}
		if mirrorHits.Load() == before || upHits.Load() != 0 {
			t.Fatalf("%s: the pull asked the mirror %d times and the registry %d times; want the mirror only", when, mirrorHits.Load()-before, upHits.Load())
		}
		if _, err := images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
			t.Fatal(err)
		}
	}
	// containerd's own reading of the inline mirror, for comparison.
	pull("inline mirror")
	if mirrorHits.Load() == pushHits {
		t.Fatal("no pull reached the mirror")
	}

	mgr, sd := systemdFor(t, ctx, u)
	certs := filepath.Join(dir, "certs.d")
	cfg := prep.Config{Options: prep.Options{CertsDir: certs, MigrateMirrors: true}, Path: cfgPath, HostRoot: "/",
		Unit: "containerd.service", Socket: u.socket(), RestartTimeout: time.Minute}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	plan, err := prep.Run(ctx, cfg, sd, log)
	if err != nil {
		t.Fatal(err)
	}
	if !plan.Changed || len(plan.Hosts) != 1 || mgr.Restarts("containerd.service") != 1 {
		t.Fatalf("prep: changed=%v hosts=%d restarts=%d; want a change, one migrated mirror, one restart", plan.Changed, len(plan.Hosts), mgr.Restarts("containerd.service"))
	}
	b, err := os.ReadFile(filepath.Join(certs, upHost, "hosts.toml"))
	if err != nil || !strings.Contains(string(b), fmt.Sprintf("[host.%q]", mirror.URL)) {
		t.Fatalf("migrated hosts.toml (%v) does not name the mirror %s:\n%s", err, mirror.URL, b)
	}
	if strings.Contains(u.logTail(), "cannot be set when `config_path` is provided") {
		t.Fatal("containerd refused the migrated config")
	}
	// The CRI plugin is up (no mirrors beside config_path) and reads the
	// migrated hosts.toml.
	pull("migrated hosts.toml")

	plan, err = prep.Run(ctx, cfg, sd, log)
	if err != nil || plan.Changed || mgr.Restarts("containerd.service") != 1 {
		t.Fatalf("second prep: err=%v changed=%v restarts=%d; want nothing", err, plan.Changed, mgr.Restarts("containerd.service"))
	}
}
