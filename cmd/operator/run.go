package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/fleetmirror/fleetmirror/agent/version"
	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

func runCommand(fs *flag.FlagSet) func(context.Context) error {
	o := manager.Options{}
	var agentImage, operatorImage, logLevel string
	fs.StringVar(&o.WatchesFile, "watches-file", "watches.yaml", "kinds and the charts they are reconciled into")
	// The images map's defaults until the operator chart passes its own.
	fs.StringVar(&agentImage, "agent-image", "ghcr.io/fleetmirror/agent:"+version.Version, "agent image, used when a resource names none")
	fs.StringVar(&operatorImage, "operator-image", "ghcr.io/fleetmirror/operator:"+version.Version, "operator image, for the uninstall hook that waits for node cleanup")
	fs.StringVar(&o.Inputs.Mirror, "image-mirror", "", "host[:port][/prefix] every rendered image is pulled from (air-gapped installs)")
	fs.BoolVar(&o.LeaderElection, "leader-elect", true, "elect one active replica")
	fs.StringVar(&o.LeaderElectionNamespace, "leader-election-namespace", "", "namespace of the leader lease (default: the pod's)")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":8080", "listen address of /metrics; 0 turns it off")
	fs.StringVar(&o.ProbeAddr, "probe-addr", ":8081", "listen address of /healthz and /readyz; 0 turns it off")
	fs.DurationVar(&o.Timeouts.Install, "install-timeout", 5*time.Minute, "longest wait on install hooks")
	fs.DurationVar(&o.Timeouts.Upgrade, "upgrade-timeout", 5*time.Minute, "longest wait on upgrade hooks")
	fs.DurationVar(&o.Timeouts.Uninstall, "uninstall-timeout", 10*time.Minute, "longest wait on the uninstall's node cleanup")
	fs.DurationVar(&o.ReconcilePeriod, "reconcile-period", 10*time.Minute, "re-check every release this often, besides events")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return func(ctx context.Context) error {
		log, err := cli.NewLogger(logLevel)
		if err != nil {
			return err
		}
		o.Log = log
		o.Inputs.Images = map[string]string{values.AgentImage: agentImage, values.OperatorImage: operatorImage}
		cfg, err := ctrl.GetConfig()
		if err != nil {
			return fmt.Errorf("kubeconfig: %w", err)
		}
		mgr, err := manager.New(cfg, o)
		if err != nil {
			return err
		}
		log.Info("starting operator", "version", version.Version, "watches", o.WatchesFile)
		return mgr.Start(ctx)
	}
}
