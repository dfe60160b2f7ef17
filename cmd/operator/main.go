// Command operator reconciles Spegel resources into the helm-charts/spegel
// release (run), and waits for the node cleanup of an uninstall
// (cleanup-wait, the addon chart's post-delete hook Job), and removes every
// Spegel resource before the operator goes (uninstall, the operator
// chart's pre-delete hook Job).
package main

import (
	"os"

	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

var commands = map[string]cli.Command{
	"run":          {Help: "reconcile Spegel resources into the addon chart (the default)", Flags: runCommand},
	"cleanup-wait": {Help: "wait until the cleanup DaemonSet ran on every node (post-delete hook)", Flags: cleanupWaitCommand},
	"uninstall":    {Help: "delete every Spegel resource and wait until the operator removed them (the operator chart's pre-delete hook)", Flags: uninstallCommand},
}

func main() {
	cli.Main("operator", commands, "run", os.Args[1:])
}
