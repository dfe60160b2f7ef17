package store

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"

	"github.com/fleetmirror/fleetmirror/test/cluster/containerdconfig"
)

// This file starts private containerds for tests. What it knows about
// configuring containerd 1.6 and 2.x for a test is collected in
// containerdConfig; the e2e harness can reuse it.

// containerdBinaries are the containerd versions the store is tested
// against. A missing binary fails the test: `make tools` builds 2.x and
// installs Debian's 1.6.
func containerdBinaries() []struct{ name, bin string } {
	v2 := os.Getenv("FLEETMIRROR_CONTAINERD2")
	if v2 == "" {
		v2 = "/var/cache/fleetmirror/tools/containerd-v2.4.2/bin/containerd"
	}
	return []struct{ name, bin string }{
		{"containerd-2", v2},
		{"containerd-1.6", "/usr/bin/containerd"},
	}
}

// testContainerd is a containerd started by a test, with its own root,
// state and sockets, so it never touches the host's containerd.
type testContainerd struct {
	Bin        string
	Major      int    // 1 or 2
	Dir        string // holds everything below, short enough for sockets
	Root       string
	State      string
	Socket     string
	ContentDir string // Root/io.containerd.content.v1.content
	Log        string

	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// startContainerd starts containerd bin with a minimal config and stops it
// when the test ends. It needs root.
func startContainerd(t testing.TB, bin string) *testContainerd {
	t.Helper()
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("containerd binary %s: %v (run `make tools` to install it)", bin, err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("starting containerd needs root")
	}
	major, err := containerdMajor(bin)
	if err != nil {
		t.Fatal(err)
	}
	// Not t.TempDir(): its paths can exceed the 108 bytes a unix socket
	// path may have.
	dir, err := os.MkdirTemp("/tmp", "fmctd")
	if err != nil {
		t.Fatal(err)
	}
	c := &testContainerd{
		Bin:    bin,
		Major:  major,
		Dir:    dir,
		Root:   filepath.Join(dir, "root"),
		State:  filepath.Join(dir, "state"),
		Socket: filepath.Join(dir, "c.sock"),
		Log:    filepath.Join(dir, "containerd.log"),
	}
	c.ContentDir = filepath.Join(c.Root, "io.containerd.content.v1.content")
	cfg := containerdConfig(major, c.Root, c.State, c.Socket)
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Stop(t)
		if t.Failed() {
			t.Logf("containerd log:\n%s", c.logTail())
		}
		os.RemoveAll(dir)
	})
	c.Start(t)
	return c
}

// containerdMajor reads the major version from `containerd --version`:
// "containerd github.com/containerd/containerd 1.6.20~ds1 ..." or
// "containerd github.com/containerd/containerd/v2 2.4.2 ...".
func containerdMajor(bin string) (int, error) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return 0, fmt.Errorf("%s --version: %w", bin, err)
	}
	f := strings.Fields(string(out))
	if len(f) < 3 {
		return 0, fmt.Errorf("%s --version: unexpected %q", bin, out)
	}
	major, _, _ := strings.Cut(strings.TrimPrefix(f[2], "v"), ".")
	n, err := strconv.Atoi(major)
	if err != nil {
		return 0, fmt.Errorf("%s --version: unexpected %q", bin, out)
	}
	return n, nil
}

// containerdConfig is a config for a containerd that serves only the
// content, image, lease and event APIs: containerdconfig's, with CRI
// (which would want CNI and a runtime) disabled too. imports is emptied so
// the host's /etc/containerd/conf.d is not read. 1.6 reads config version
// 2; 2.x reads version 3 (and migrates it).
func containerdConfig(major int, root, state, socket string) string {
	c := containerdconfig.Config{Version: 2, Major: major, Root: root, State: state, Socket: socket,
		NoImports: true, DebugLevel: "info", Disable: []string{"io.containerd.grpc.v1.cri"}}
	if major >= 2 {
		c.Version = 3
		c.Disable = append(c.Disable,
			"io.containerd.cri.v1.images",
			"io.containerd.cri.v1.runtime",
			"io.containerd.podsandbox.controller.v1.podsandbox",
		)
	}
	return c.String()
}

// Start starts containerd (again, after Kill) and waits until it answers.
func (c *testContainerd) Start(t testing.TB) {
	t.Helper()
	log, err := os.OpenFile(c.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(c.Bin, "--config", filepath.Join(c.Dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = log, log
	// Should the test binary die, containerd goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", c.Bin, err)
	}
	c.cmd, c.done = cmd, make(chan struct{})
	go func(done chan struct{}) {
		cmd.Wait()
		close(done)
	}(c.done)

	deadline := time.Now().Add(30 * time.Second)
	for {
		err := c.ping()
		if err == nil {
			return
		}
		select {
		case <-c.done:
			t.Fatalf("containerd exited at start: %v\n%s", cmd.ProcessState, c.logTail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd not answering on %s: %v\n%s", c.Socket, err, c.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *testContainerd) ping() error {
	cl, err := client.New(c.Socket, client.WithTimeout(time.Second))
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = cl.Version(ctx)
	return err
}

// Kill kills containerd as a crash would.
func (c *testContainerd) Kill(t testing.TB) {
	t.Helper()
	c.signal(t, syscall.SIGKILL, 10*time.Second)
}

// Stop stops containerd cleanly if it runs.
func (c *testContainerd) Stop(t testing.TB) {
	t.Helper()
	if !c.signal(t, syscall.SIGTERM, 10*time.Second) {
		c.signal(t, syscall.SIGKILL, 10*time.Second)
	}
}

// signal sends sig and reports whether containerd exited within wait.
func (c *testContainerd) signal(t testing.TB, sig syscall.Signal, wait time.Duration) bool {
	t.Helper()
	if c.cmd == nil {
		return true
	}
	select {
	case <-c.done:
		return true
	default:
	}
	if err := c.cmd.Process.Signal(sig); err != nil {
		t.Logf("signalling containerd: %v", err)
	}
	select {
	case <-c.done:
		return true
	case <-time.After(wait):
		return false
	}
}

// Client returns a client of this containerd, closed when the test ends.
func (c *testContainerd) Client(t testing.TB, namespace string) *client.Client {
	t.Helper()
	cl, err := client.New(c.Socket, client.WithDefaultNamespace(namespace), client.WithTimeout(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func (c *testContainerd) logTail() string {
	b, _ := os.ReadFile(c.Log)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(bytes.TrimSpace(b))
}
