// Package systemd restarts systemd units over D-Bus, so the agent image
// needs no shell, nsenter or systemctl to restart the host's containerd.
package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	sd "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
)

// DefaultAddress is systemd's private socket: reachable as root without a
// D-Bus daemon, which minimal hosts may not run.
const DefaultAddress = "unix:path=/run/systemd/private"

// Client talks to systemd's Manager.
type Client struct {
	conn *sd.Conn
}

// Dial connects to systemd at a D-Bus address: systemd's private socket
// (unix:path=/run/systemd/private, spoken to directly) or a message bus
// such as unix:path=/run/dbus/system_bus_socket, where systemd is
// org.freedesktop.systemd1.
func Dial(ctx context.Context, address string) (*Client, error) {
	direct := strings.HasSuffix(address, "/run/systemd/private")
	conn, err := sd.NewConnection(func() (*dbus.Conn, error) {
		c, err := dbus.Dial(address, dbus.WithContext(ctx))
		if err != nil {
			return nil, err
		}
		// EXTERNAL with the numeric uid: no user name lookup, which a
		// static binary cannot do.
		if err := c.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
			c.Close()
			return nil, err
		}
		if !direct {
			if err := c.Hello(); err != nil {
				c.Close()
				return nil, err
			}
		}
		return c, nil
	})
	if err != nil {
		return nil, fmt.Errorf("connecting to systemd at %s: %w", address, err)
	}
	return &Client{conn: conn}, nil
}

// Close closes the connection.
func (c *Client) Close() { c.conn.Close() }

// CheckUnit fails unless systemd answers and knows unit.
func (c *Client) CheckUnit(ctx context.Context, unit string) error {
	st, err := c.conn.ListUnitsByNamesContext(ctx, []string{unit})
	if err != nil {
		return fmt.Errorf("asking systemd about %s: %w", unit, err)
	}
	if len(st) != 1 || st[0].LoadState != "loaded" {
		state := "unknown"
		if len(st) == 1 {
			state = st[0].LoadState
		}
		return fmt.Errorf("systemd unit %s is %s; set --containerd-unit to containerd's unit name", unit, state)
	}
	return nil
}

// ErrJobFailed is returned when systemd ran the restart job but it did
// not end in "done".
var ErrJobFailed = errors.New("systemd restart job failed")

// RestartUnit restarts unit and waits for systemd's job to finish.
func (c *Client) RestartUnit(ctx context.Context, unit string) error {
	done := make(chan string, 1)
	if _, err := c.conn.RestartUnitContext(ctx, unit, "replace", done); err != nil {
		return fmt.Errorf("asking systemd to restart %s: %w", unit, err)
	}
	select {
	case res := <-done:
		if res != "done" {
			return fmt.Errorf("%w: %s ended %q; see `journalctl -u %s` on the node", ErrJobFailed, unit, res, unit)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for systemd to restart %s: %w", unit, ctx.Err())
	}
}
