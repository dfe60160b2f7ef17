package systemd_test

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/systemd"
	"github.com/fleetmirror/fleetmirror/agent/systemd/systemdtest"
)

// TestRestartOverDBus drives the production client against a real
// dbus-daemon on which a stand-in for systemd's Manager (systemdtest)
// restarts a real child process: the client's RestartUnit returns only
// after the JobRemoved signal, when the new process runs.
func TestRestartOverDBus(t *testing.T) {
	addr := systemdtest.StartBus(t)

	var mu sync.Mutex
	var proc *exec.Cmd
	start := func() error {
		cmd := exec.Command("sleep", "300")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return err
		}
		mu.Lock()
		proc = cmd
		mu.Unlock()
		return nil
	}
	pid := func() int {
		mu.Lock()
		defer mu.Unlock()
		return proc.Process.Pid
	}
	if err := start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		proc.Process.Kill()
		proc.Wait()
	})
	m := systemdtest.Serve(t, addr, map[string]func() error{
		"containerd.service": func() error {
			mu.Lock()
			old := proc
			mu.Unlock()
			old.Process.Kill()
			old.Wait()
			time.Sleep(50 * time.Millisecond) // a restart takes a while; the client must wait for the job
			return start()
		},
		"broken.service": func() error { return errors.New("exit status 1") },
	})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := systemd.Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if err := c.CheckUnit(ctx, "containerd.service"); err != nil {
		t.Fatalf("CheckUnit: %v", err)
	}
	if err := c.CheckUnit(ctx, "containerd-typo.service"); err == nil || !strings.Contains(err.Error(), "not-found") {
		t.Fatalf("CheckUnit of an unknown unit: %v, want not-found", err)
	}

	before := pid()
	if err := c.RestartUnit(ctx, "containerd.service"); err != nil {
		t.Fatalf("RestartUnit: %v", err)
	}
	// The job's end was signalled after the new process started, and the
	// client waited for it.
	if after := pid(); after == before {
		t.Fatalf("pid unchanged (%d) after RestartUnit returned", after)
	}
	if n := m.Restarts("containerd.service"); n != 1 {
		t.Fatalf("restarts = %d, want 1", n)
	}

	if err := c.RestartUnit(ctx, "broken.service"); !errors.Is(err, systemd.ErrJobFailed) {
		t.Fatalf("restart of a failing unit: %v, want ErrJobFailed", err)
	}
	if err := c.RestartUnit(ctx, "missing.service"); err == nil || !strings.Contains(err.Error(), "NoSuchUnit") && !strings.Contains(err.Error(), "not found") {
		t.Fatalf("restart of a missing unit: %v", err)
	}
}

// TestDialNoSystemd: no bus at the address is an error naming it.
func TestDialNoSystemd(t *testing.T) {
	addr := "unix:path=" + filepath.Join(t.TempDir(), "private")
	_, err := systemd.Dial(context.Background(), addr)
	if err == nil || !strings.Contains(err.Error(), addr) {
		t.Fatalf("Dial(%s) = %v, want an error naming the address", addr, err)
	}
}
