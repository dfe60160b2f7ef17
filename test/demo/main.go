// Command demo runs fleetmirror on a local cluster of network-namespace
// nodes, each with a real containerd and agent, and narrates a pull on
// node 1 and then on the others. `make demo` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

func main() {
	var (
		agent      = flag.String("agent", "bin/agent", "the built agent binary")
		nodes      = flag.Int("nodes", 3, "nodes in the cluster (at least 2)")
		containerd = flag.String("containerd", "2", `containerd on the nodes: "2" (2.x) or "1.6" (Debian's)`)
		size       = flag.Int64("size", 256<<20, "bytes of the generated image")
		layers     = flag.Int("layers", 4, "layers of the generated image")
		wait       = flag.Bool("wait", true, "keep the cluster up until Ctrl-C")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *agent, *nodes, *containerd, *size, *layers, *wait); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, agent string, nodes int, containerd string, size int64, layers int, wait bool) error {
	if nodes < 2 {
		return fmt.Errorf("-nodes %d: a peer pull needs at least 2 nodes", nodes)
	}
	say("starting %d nodes (containerd %s, one agent each) and an upstream registry", nodes, containerd)
	start := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{Nodes: nodes, Containerd: containerd, AgentBin: agent})
	if err != nil {
		return err
	}
	defer func() {
		say("removing the cluster")
		c.Close()
	}()
	say("cluster up in %s; upstream registry at %s", time.Since(start).Round(time.Millisecond), c.Upstream.URL())

	img, err := cluster.GenerateImage(time.Now().UnixNano(), size, layers)
	if err != nil {
		return err
	}
	ref := c.Upstream.Ref("demo/app:v1")
	if err := c.Upstream.Push(ctx, ref, img.Image); err != nil {
		return err
	}
	say("pushed %s (%d MiB in %d layers)", ref, size>>20, layers)

	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "node\tpull time\tfrom peers\tfrom upstream\tupstream requests\t")
	for _, n := range c.Nodes {
		before, err := n.Metrics(ctx)
		if err != nil {
			return err
		}
		c.Upstream.Reset()
		d, err := n.Pull(ctx, ref)
		if err != nil {
			return fmt.Errorf("pull on %s: %w\n%s", n.Name, err, n.LogTail(20))
		}
		if err := n.VerifyContent(ctx, img.Digests()); err != nil {
			return fmt.Errorf("content on %s: %w", n.Name, err)
		}
		after, err := n.Metrics(ctx)
		if err != nil {
			return err
		}
		peer := after.Sum("fleetmirror_mirror_served_bytes_total", "source", "peer") -
			before.Sum("fleetmirror_mirror_served_bytes_total", "source", "peer")
		st := c.Upstream.Stats()
		var upBytes, upReqs int64
		for _, cnt := range st.ByClient[n.IP] {
			upBytes += cnt.Bytes
			upReqs += cnt.Requests
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t\n", n.Name, d.Round(time.Millisecond), mib(int64(peer)), mib(upBytes), upReqs)
	}
	tw.Flush()

	fmt.Println()
	for _, n := range c.Nodes {
		say("%s: debug page http://%s:%d/debug/web  metrics %s  agent log %s", n.Name, n.IP, cluster.AgentMetricsPort, n.MetricsURL(), n.AgentLog)
	}
	if !wait {
		return nil
	}
	say("the cluster stays up until Ctrl-C")
	<-ctx.Done()
	return nil
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func say(format string, args ...any) {
	fmt.Printf("[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
