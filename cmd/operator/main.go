// Command operator reconciles Spegel resources into the helm-charts/spegel
// release (run), and waits for the node cleanup of an uninstall
// (cleanup-wait, the chart's post-delete hook Job).
package main

import (
	"os"

	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

var commands = map[string]cli.Command{
	"run":          {Help: "reconcile Spegel resources into the addon chart (the default)", Flags: runCommand},
	"cleanup-wait": {Help: "wait until the cleanup DaemonSet ran on every node (post-delete hook)", Flags: cleanupWaitCommand},
}

func main() {
	cli.Main("operator", commands, "run", os.Args[1:])
}
