package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/fleetmirror/fleetmirror/agent/version"
	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
	"github.com/fleetmirror/fleetmirror/operator/config"
	"github.com/fleetmirror/fleetmirror/operator/manager"
	"github.com/fleetmirror/fleetmirror/operator/status"
	"github.com/fleetmirror/fleetmirror/operator/values"
)

func runCommand(fs *flag.FlagSet) func(context.Context) error {
	o := manager.Options{}
	var agentImage, operatorImage, logLevel, configFile string
	fs.StringVar(&o.WatchesFile, "watches-file", "watches.yaml", "kinds and the charts they are reconciled into")
	fs.StringVar(&configFile, "config", "", "the operator chart's configuration file (images map, imageMirror, provider override, nodeReadiness, managedNamespaces); flags given explicitly win over it")
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
	fs.DurationVar(&o.ReconcilePeriod, "reconcile-period", 10*time.Minute, "re-check every release this often, besides events; a watches.yaml entry's reconcilePeriod wins for its kind")
	fs.DurationVar(&o.HitRatioWindow, "hit-ratio-window", 10*time.Minute, "window of the cluster peer hit ratio in status.peerHits, scraped from the agents; 0 turns it off")
	fs.BoolVar(&o.MirrorPath, "mirror-path", true, "read each agent's canary verdict (GET /canary on the metrics port) into status.mirrorPath, every --mirror-path-period and on agent pod changes")
	fs.DurationVar(&o.MirrorPathPeriod, "mirror-path-period", status.DefaultAgentPollPeriod, "how often the agents' canary verdicts (and the peer hit ratio) are read besides agent pod changes: a node's condition lags its agent by at most this; the chart's mirrorPathPeriod")
	fs.BoolVar(&o.NodeConditions, "node-conditions", false, "also write it on each node as the FleetmirrorMirrorPath condition (needs patch on nodes/status; the chart's nodeConditions)")
	fs.DurationVar(&o.ReleaseAfter, "release-after", 5*time.Minute, "node readiness holds a node at most this long from its creation, then removes the startup taint with a warning (fail open); the chart's nodeReadiness.releaseAfter")
	fs.IntVar(&o.AgentMetricsPort, "agent-metrics-port", 30122, "where agents serve /metrics when a resource's values do not say")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return func(ctx context.Context) error {
		if o.MirrorPathPeriod < time.Second {
			return fmt.Errorf("--mirror-path-period %s: want at least 1s (a minute in production)", o.MirrorPathPeriod)
		}
		log, err := cli.NewLogger(logLevel)
		if err != nil {
			return err
		}
		o.Log = log
		o.Inputs.Images = map[string]string{values.AgentImage: agentImage, values.OperatorImage: operatorImage}
		if configFile != "" {
			c, err := config.Load(configFile)
			if err != nil {
				return fmt.Errorf("--config: %w", err)
			}
			applyConfig(fs, &o, &c)
		}
		cfg, err := ctrl.GetConfig()
		if err != nil {
			return fmt.Errorf("kubeconfig: %w", err)
		}
		mgr, err := manager.New(cfg, o)
		if err != nil {
			return err
		}
		log.Info("starting operator", "version", version.Version, "watches", o.WatchesFile, "provider", o.Provider,
			"imageMirror", o.Inputs.Mirror, "nodeReadiness", o.NodeReadiness, "managedNamespaces", o.ManagedNamespaces)
		return mgr.Start(ctx)
	}
}

// applyConfig lays the operator chart's configuration file under the
// flags: a flag given explicitly wins over the file.
func applyConfig(fs *flag.FlagSet, o *manager.Options, c *config.Config) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for k, v := range c.Images {
		if !set[k+"-image"] {
			o.Inputs.Images[k] = v
		}
	}
	if !set["image-mirror"] {
		o.Inputs.Mirror = c.ImageMirror
	}
	o.Provider, o.Inputs.Defaults = c.Provider.Name, c.Provider.Spegel
	o.NodeReadiness, o.ReportAfter = c.NodeReadiness.Enabled, c.ReportAfter()
	if !set["release-after"] {
		o.ReleaseAfter = c.ReleaseAfter()
	}
	if !set["node-conditions"] {
		o.NodeConditions = c.NodeConditions
	}
	o.ManagedNamespaces = c.ManagedNamespaces
}
