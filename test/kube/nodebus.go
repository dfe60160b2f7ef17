package kube

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/systemd/systemdtest"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// ContainerdUnit is the unit name each node's stand-in systemd knows.
const ContainerdUnit = "containerd.service"

// NodeBus is one node's system bus (Options.PrivateMounts): a private
// dbus-daemon whose socket the node sees at /run/dbus/system_bus_socket,
// with a stand-in systemd Manager on it whose RestartUnit of
// ContainerdUnit restarts that node's containerd, the way prep restarts
// containerd on a real node.
type NodeBus struct {
	Node    *cluster.Node
	Address string // D-Bus address as the harness dials it
	Systemd *systemdtest.Manager
	Log     string

	proc *cluster.Process
}

// startBus starts node n's bus and stand-in systemd.
func (c *Cluster) startBus(ctx context.Context, n *cluster.Node) (*NodeBus, error) {
	bin, err := exec.LookPath("dbus-daemon")
	if err != nil {
		return nil, fmt.Errorf("dbus-daemon not found (Debian package dbus; run `make tools`): %w", err)
	}
	sock := filepath.Join(n.DBusDir, "system_bus_socket")
	b := &NodeBus{Node: n, Address: "unix:path=" + sock, Log: filepath.Join(n.Dir, "dbus.log")}
	// In the node's network namespace, so a crashed run's cleanup finds
	// it with the node's other processes.
	b.proc, err = cluster.StartProcess(n.NS, b.Log, nil, bin, "--session", "--nofork", "--nopidfile", "--address="+b.Address)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if done, err := b.proc.Exited(); done {
			return nil, fmt.Errorf("%s: dbus-daemon exited (%v): %s", n.Name, err, cluster.TailFile(b.Log, 10))
		}
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			_ = b.proc.Stop(time.Second)
			return nil, fmt.Errorf("%s: dbus-daemon made no socket %s in 10s: %s", n.Name, sock, cluster.TailFile(b.Log, 10))
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Systemd, err = systemdtest.Listen(b.Address, map[string]func() error{
		ContainerdUnit: func() error {
			c.logf("kube %s: %s: systemd stand-in restarts containerd", c.ID, n.Name)
			// Not the caller's ctx: the restart outlives the D-Bus call.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			return n.RestartContainerd(ctx)
		},
	})
	if err != nil {
		_ = b.proc.Stop(time.Second)
		return nil, fmt.Errorf("%s: %w", n.Name, err)
	}
	return b, nil
}

func (b *NodeBus) close() error {
	return errors.Join(b.Systemd.Close(), b.proc.Stop(5*time.Second))
}
