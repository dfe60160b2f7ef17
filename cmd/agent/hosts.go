package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/hosts"
	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

// hostsCommand prints the hosts.toml files for the user-data mode, where
// the node writes its mirror configuration at boot, before any pod runs.
func hostsCommand(fs *flag.FlagSet) func(context.Context) error {
	var (
		targets, registries cli.List
		certsDir            string
		dialTimeout         time.Duration
	)
	fs.Var(&targets, "mirror-target", "URL containerd asks first, e.g. http://${NODE_IP}:30120 (required)")
	fs.Var(&registries, "mirrored-registries", "registry URLs to mirror; empty mirrors all through _default")
	fs.StringVar(&certsDir, "certs-dir", hosts.DefaultCertsDir, "containerd's registry config_path")
	fs.DurationVar(&dialTimeout, "mirror-dial-timeout", 200*time.Millisecond, "containerd's dial timeout to the agent")
	return func(context.Context) error {
		if len(targets) == 0 {
			return fmt.Errorf("--mirror-target is required, e.g. --mirror-target=http://${NODE_IP}:30120")
		}
		files, err := hosts.Render(hosts.Config{CertsDir: certsDir, MirrorTargets: targets, Registries: registries, DialTimeout: dialTimeout})
		if err != nil {
			return err
		}
		names := make([]string, 0, len(files))
		for n := range files {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Printf("# %s\n%s\n", filepath.Join(certsDir, n), files[n])
		}
		return nil
	}
}

// cleanupCommand restores what was there before the agent wrote hosts.toml;
// the chart runs it when the addon is removed.
func cleanupCommand(fs *flag.FlagSet) func(context.Context) error {
	certsDir := fs.String("certs-dir", hosts.DefaultCertsDir, "containerd's registry config_path")
	return func(context.Context) error {
		if err := hosts.Cleanup(*certsDir); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "restored containerd mirror configuration under %s\n", *certsDir)
		return nil
	}
}
