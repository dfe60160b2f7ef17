package systemdtest

import (
	"fmt"

	"github.com/godbus/dbus/v5"
)

// Listen is Serve for harnesses outside a test (test/kube's nodes, the
// demo): it registers a Manager on the bus at address and returns it, or
// an error; Close unregisters it.
func Listen(address string, units map[string]func() error) (*Manager, error) {
	conn, err := dbus.Connect(address)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", address, err)
	}
	m := &Manager{conn: conn, units: units, restarts: map[string]int{}}
	if err := conn.Export(m, objectPath, iface); err != nil {
		conn.Close()
		return nil, err
	}
	reply, err := conn.RequestName("org.freedesktop.systemd1", dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		conn.Close()
		return nil, fmt.Errorf("owning org.freedesktop.systemd1 on %s: reply %v, %v", address, reply, err)
	}
	return m, nil
}

// Close waits for running restart jobs and leaves the bus.
func (m *Manager) Close() error {
	m.pending.Wait()
	return m.conn.Close()
}
