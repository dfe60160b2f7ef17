package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/hosts"
	"github.com/fleetmirror/fleetmirror/agent/prep"
	"github.com/fleetmirror/fleetmirror/agent/systemd"
	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

// DefaultContainerdConfig is where containerd reads its config on the host.
const defaultContainerdConfig = "/etc/containerd/config.toml"

type prepConfig struct {
	cfg            prep.Config
	check          bool
	systemdAddress string
	logLevel       string
}

func prepCommand(fs *flag.FlagSet) func(context.Context) error {
	c := &prepConfig{}
	fs.StringVar(&c.cfg.Path, "config", defaultContainerdConfig, "containerd's config.toml (mount the folder holding it, not the file: it is replaced by a rename)")
	fs.StringVar(&c.cfg.HostRoot, "host-root", "/", "where the host's / is mounted; the config's absolute imports and /etc/os-release are read under it")
	fs.StringVar(&c.cfg.CertsDir, "certs-dir", hosts.DefaultCertsDir, "the folder containerd's config_path must name: where the agent writes hosts.toml")
	fs.BoolVar(&c.cfg.OverrideConfigPath, "override-config-path", false, "replace a config_path that names another folder")
	fs.BoolVar(&c.cfg.MigrateMirrors, "migrate-mirrors", false, "move inline registry.mirrors entries (which containerd refuses beside config_path) into hosts.toml files under --certs-dir instead of refusing the node")
	fs.BoolVar(&c.check, "check", false, "print what is set and what would change; exit 0 when the node is ready, 1 otherwise; change nothing")
	fs.StringVar(&c.systemdAddress, "systemd-address", systemd.DefaultAddress, "D-Bus address of systemd: its private socket, or the system bus (unix:path=/run/dbus/system_bus_socket)")
	fs.StringVar(&c.cfg.Unit, "containerd-unit", "containerd.service", "containerd's systemd unit")
	fs.StringVar(&c.cfg.Socket, "containerd-socket", "/run/containerd/containerd.sock", "containerd's socket, polled after the restart")
	fs.DurationVar(&c.cfg.RestartTimeout, "restart-timeout", 2*time.Minute, "how long the restart and containerd's answer may take")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	return func(ctx context.Context) error { return runPrep(ctx, c) }
}

func runPrep(ctx context.Context, c *prepConfig) error {
	log, err := cli.NewLogger(c.logLevel)
	if err != nil {
		return err
	}
	if c.cfg.RestartTimeout <= 0 {
		return fmt.Errorf("--restart-timeout %s: want more than 0", c.cfg.RestartTimeout)
	}
	if c.check {
		plan, err := prep.Check(c.cfg)
		printPlan(c.cfg.Path, c.cfg.CertsDir, plan)
		if err != nil {
			return err
		}
		if !plan.Ready() {
			return errors.New("node not ready: containerd's config lacks the settings above; run `agent prep`")
		}
		fmt.Println("ready")
		return nil
	}
	// Dial only when a change needs the restart, so a prepared node does
	// not need systemd reachable; Run checks the unit before writing.
	plan, err := prep.Check(c.cfg)
	if err != nil {
		printPlan(c.cfg.Path, c.cfg.CertsDir, plan)
		return err
	}
	var r prep.Restarter
	var client *systemd.Client
	if plan.Changed {
		client, err = systemd.Dial(ctx, c.systemdAddress)
		if err != nil {
			return fmt.Errorf("%w: %v; nothing was changed: mount the host's /run/systemd and set --systemd-address, or prepare the node by hand", prep.ErrRefused, err)
		}
		defer client.Close()
		r = client
	}
	plan, err = prep.Run(ctx, c.cfg, r, log)
	printPlan(c.cfg.Path, c.cfg.CertsDir, plan)
	return err
}

func printPlan(path, certsDir string, plan *prep.Plan) {
	if plan == nil {
		return
	}
	if plan.Path != "" && plan.Path != path {
		path += " -> " + plan.Path
	}
	if plan.FromEmpty {
		fmt.Fprintf(os.Stdout, "%s has no settings (containerd's defaults); it is written as config version 2:\n", path)
	} else {
		fmt.Fprintf(os.Stdout, "%s (config version %d):\n", path, plan.Version)
	}
	for _, s := range plan.Settings {
		fmt.Fprintf(os.Stdout, "  %s\n", s)
	}
	for _, h := range plan.Hosts {
		state := "to write"
		if h.Exists {
			state = "already there"
		}
		if h.AsBackup {
			state += ", as the file the agent keeps after its own hosts"
		}
		fmt.Fprintf(os.Stdout, "  inline mirror %q -> %s (%s)\n", h.Registry, h.Path(certsDir), state)
	}
}

// keepaliveCommand idles until stopped: the prep DaemonSet's second
// container, so it needs no pause image.
func keepaliveCommand(*flag.FlagSet) func(context.Context) error {
	return func(ctx context.Context) error {
		<-ctx.Done()
		return nil
	}
}
