// Command agent runs on every node: it mirrors images between peers
// (mirror), and prepares and restores the node's containerd configuration.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/fleetmirror/fleetmirror/agent/version"
	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

var commands = map[string]cli.Command{
	"mirror":    {Help: "serve the node's images to peers and mirror from peers for containerd", Flags: mirrorCommand},
	"hosts":     {Help: "print the hosts.toml files a node's user data should write", Flags: hostsCommand},
	"cleanup":   {Help: "restore the node's containerd mirror configuration as it was", Flags: cleanupCommand},
	"prep":      {Help: "set containerd's config_path and discard_unpacked_layers, restart it if changed (--check: report only)", Flags: prepCommand},
	"keepalive": {Help: "idle until stopped (the prep DaemonSet's keepalive container)", Flags: keepaliveCommand},
	"version": {Help: "print the version", Flags: func(*flag.FlagSet) func(context.Context) error {
		return func(context.Context) error { fmt.Println(version.Version); return nil }
	}},
}

func main() {
	cli.Main("agent", commands, "", os.Args[1:])
}
