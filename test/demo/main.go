// Command demo is `make demo`: it runs fleetmirror on a local multi-node
// Kubernetes cluster exactly as a platform team would and narrates it
// (test/system): helm install of the operator with the Nebius override and
// imageMirror, containerd-prep and the agents becoming ready, a 250 MB
// workload rolled out node by node with later nodes pulling from peers,
// an agent pod deleted mid-rollout, a fresh node while the upstream is
// down, the uninstall, and the same rollout without the addon. It ends
// with the measured report and removes everything it made.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/fleetmirror/fleetmirror/test/system"
)

func main() {
	var (
		nodes   = flag.Int("nodes", 3, "worker nodes at start (at least 2); one more joins later")
		size    = flag.Int64("size", 240<<20, "bytes of the generated workload image")
		layers  = flag.Int("layers", 4, "layers of the workload image")
		rate    = flag.Int64("upstream-rate", 40<<20, "the upstream's link in bytes/s, shared by all nodes")
		logFile = flag.String("log", "bin/demo.log", "where the cluster harness logs")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lf, err := os.Create(*logFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
	defer lf.Close()
	harness := log.New(lf, "", log.LstdFlags|log.Lmicroseconds)
	fmt.Printf("fleetmirror demo (harness log: %s)\n\n", *logFile)
	rep, err := system.Run(ctx, system.Options{
		Nodes: *nodes, WorkloadSize: *size, WorkloadLayers: *layers, UpstreamRate: *rate,
		Say:  func(format string, args ...any) { fmt.Printf(format+"\n", args...) },
		Logf: harness.Printf,
	})
	if rep != nil {
		fmt.Printf("\n%s", rep)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo:", err)
		os.Exit(1)
	}
}
