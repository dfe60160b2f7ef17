// Package systemdtest is a stand-in for systemd's unit manager for tests:
// it runs a real, private D-Bus daemon (Debian's dbus-daemon) and serves
// org.freedesktop.systemd1.Manager's RestartUnit and ListUnitsByNames on
// it, emitting the JobRemoved signal systemd sends when a job ends. What a
// "restart" does is up to the test, e.g. restart a real containerd.
package systemdtest

import (
	"bufio"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

const (
	objectPath = dbus.ObjectPath("/org/freedesktop/systemd1")
	iface      = "org.freedesktop.systemd1.Manager"
)

// StartBus starts a private dbus-daemon, stopped when the test ends, and
// returns its address.
func StartBus(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("dbus-daemon")
	if err != nil {
		t.Fatalf("dbus-daemon not found (Debian package dbus; run `make tools`): %v", err)
	}
	cmd := exec.Command(bin, "--session", "--nofork", "--print-address=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting dbus-daemon: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case addr := <-line:
		if addr == "" {
			t.Fatal("dbus-daemon printed no address")
		}
		return addr
	case <-time.After(10 * time.Second):
		t.Fatal("dbus-daemon printed no address in 10s")
	}
	return ""
}

// Manager answers as org.freedesktop.systemd1 on a bus.
type Manager struct {
	conn  *dbus.Conn
	units map[string]func() error

	mu       sync.Mutex
	jobs     uint32
	restarts map[string]int
	pending  sync.WaitGroup
}

// unitStatus is systemd's (ssssssouso) unit status record.
type unitStatus struct {
	Name, Description, LoadState, ActiveState, SubState, Followed string
	Path                                                          dbus.ObjectPath
	JobID                                                         uint32
	JobType                                                       string
	JobPath                                                       dbus.ObjectPath
}

// Serve registers a Manager on the bus at address. units maps unit names
// to what restarting them does; other names are unknown units.
func Serve(t testing.TB, address string, units map[string]func() error) *Manager {
	t.Helper()
	conn, err := dbus.Connect(address)
	if err != nil {
		t.Fatalf("connecting to %s: %v", address, err)
	}
	m := &Manager{conn: conn, units: units, restarts: map[string]int{}}
	t.Cleanup(func() {
		m.pending.Wait()
		conn.Close()
	})
	if err := conn.Export(m, objectPath, iface); err != nil {
		t.Fatal(err)
	}
	reply, err := conn.RequestName("org.freedesktop.systemd1", dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("owning org.freedesktop.systemd1: reply %v, %v", reply, err)
	}
	return m
}

// Restarts returns how often unit was restarted.
func (m *Manager) Restarts(unit string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.restarts[unit]
}

// RestartUnit is the D-Bus method: it starts a job that runs the unit's
// restart function and returns the job's path at once, as systemd does;
// JobRemoved reports the result ("done" or "failed") when it ends.
func (m *Manager) RestartUnit(name, mode string) (dbus.ObjectPath, *dbus.Error) {
	restart, ok := m.units[name]
	if !ok {
		return "", dbus.NewError("org.freedesktop.systemd1.NoSuchUnit", []any{fmt.Sprintf("Unit %s not found.", name)})
	}
	m.mu.Lock()
	m.jobs++
	id := m.jobs
	m.restarts[name]++
	m.mu.Unlock()
	job := dbus.ObjectPath(fmt.Sprintf("%s/job/%d", objectPath, id))
	m.pending.Add(1)
	go func() {
		defer m.pending.Done()
		result := "done"
		if err := restart(); err != nil {
			result = "failed"
		}
		m.conn.Emit(objectPath, iface+".JobRemoved", id, job, name, result)
	}()
	return job, nil
}

// ListUnitsByNames is the D-Bus method: known units are loaded and
// active, others not-found, as systemd reports them.
func (m *Manager) ListUnitsByNames(names []string) ([]unitStatus, *dbus.Error) {
	out := make([]unitStatus, 0, len(names))
	for _, n := range names {
		st := unitStatus{Name: n, LoadState: "not-found", ActiveState: "inactive", SubState: "dead", Path: objectPath + "/unit/x", JobPath: "/"}
		if _, ok := m.units[n]; ok {
			st.LoadState, st.ActiveState, st.SubState = "loaded", "active", "running"
		}
		out = append(out, st)
	}
	return out, nil
}
