// Command rollout measures image rollouts as users judge them: every node
// pulling a new image at once ("create"), and a rolling update from v1 to
// v2 a fifth of the nodes at a time ("update"), with and without the
// agent, against an upstream shaped like an internet registry. It writes
// results.csv, summary.md and box plots. `make bench` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/bench/report"
	"github.com/fleetmirror/fleetmirror/bench/workload"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

type config struct {
	agent, containerd, images, out string
	scenarios, modes, agentArgs    string
	keep                           bool
	nodes                          int
	rate                           int64
	latency, stagger               time.Duration
	batch                          float64
	seed                           int64
}

func main() {
	var c config
	flag.StringVar(&c.agent, "agent", "bin/agent", "the built agent binary")
	flag.StringVar(&c.containerd, "containerd", "2", `containerd on the nodes: "2" or "1.6"`)
	flag.StringVar(&c.images, "images", "10MB/1,10MB/4,100MB/1,100MB/4,1GB/1,1GB/4", "images to roll out, SIZE/LAYERS")
	flag.StringVar(&c.out, "out", "bench/results", "folder for results.csv, summary.md and plots")
	flag.IntVar(&c.nodes, "nodes", 6, "nodes in the cluster")
	flag.Int64Var(&c.rate, "upstream-rate", 100_000_000, "upstream bandwidth in bytes/s, shared by all nodes (0: unshaped)")
	flag.DurationVar(&c.latency, "upstream-latency", 20*time.Millisecond, "latency added to every upstream request")
	flag.DurationVar(&c.stagger, "stagger", 0, "create: spread the nodes' pull starts evenly over this long, as a scale-up's nodes become ready over seconds")
	flag.Float64Var(&c.batch, "update-batch", 0.2, "share of nodes updated at a time")
	flag.Int64Var(&c.seed, "seed", 1, "seed of the generated images")
	flag.StringVar(&c.scenarios, "scenarios", "create,update", "which rollouts to measure: create, update or both")
	flag.StringVar(&c.modes, "modes", "baseline,fleetmirror", "which modes to measure: baseline, fleetmirror or both")
	flag.StringVar(&c.agentArgs, "agent-args", "", `more agent flags, e.g. "--burst-settle 300ms --log-level debug"`)
	flag.BoolVar(&c.keep, "keep", false, "keep the cluster's folder (containerd and agent logs) after the run")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "rollout:", err)
		os.Exit(1)
	}
}

type image struct {
	spec   workload.Spec
	v1, v2 string
	g1, g2 *cluster.GeneratedImage
}

func run(ctx context.Context, c config) error {
	specs, err := workload.ParseSpecs(c.images)
	if err != nil {
		return err
	}
	if c.nodes < 2 || c.batch <= 0 || c.batch > 1 {
		return fmt.Errorf("-nodes %d -update-batch %g: want at least 2 nodes and a batch share in (0, 1]", c.nodes, c.batch)
	}
	if c.stagger < 0 || c.stagger > time.Minute {
		return fmt.Errorf("-stagger %s: want 0 (all at once) to 1m", c.stagger)
	}
	cl, err := cluster.Start(ctx, cluster.Options{Nodes: c.nodes, Containerd: c.containerd, AgentBin: c.agent,
		AgentArgs:    strings.Fields(c.agentArgs),
		UpstreamRate: c.rate, UpstreamLatency: c.latency, KeepDir: c.keep})
	if err != nil {
		return err
	}
	defer cl.Close()

	// Pushing is setup, not measured: unshaped, then the shaping is on.
	cl.Upstream.SetShaping(0, 0)
	var imgs []image
	for i, s := range specs {
		img := image{spec: s}
		for v, dst := range []*string{&img.v1, &img.v2} {
			g, err := cluster.GenerateImage(c.seed*1000+int64(i*2+v), s.Size, s.Layers)
			if err != nil {
				return err
			}
			*dst = cl.Upstream.Ref(fmt.Sprintf("rollout/%s:v%d", strings.ToLower(s.Name), v+1))
			if err := cl.Upstream.Push(ctx, *dst, g.Image); err != nil {
				return err
			}
			if v == 0 {
				img.g1 = g
			} else {
				img.g2 = g
			}
		}
		imgs = append(imgs, img)
	}
	cl.Upstream.SetShaping(c.rate, c.latency)

	res := &report.Results{Setup: []string{
		fmt.Sprintf("%d nodes, containerd %s, each node a network namespace on one %d-core machine", c.nodes, c.containerd, numCPU()),
		fmt.Sprintf("upstream: %s shared, +%s per request", rateString(c.rate), c.latency),
		fmt.Sprintf("update batches: %d nodes at a time", batchSize(c.nodes, c.batch)),
		"baseline: agents stopped, containerd pulls from the upstream directly",
		fmt.Sprintf("create: the nodes start pulling over %s", c.stagger),
		"command: go run ./bench/rollout " + fmt.Sprint(os.Args[1:]),
	}}
	for _, mode := range []string{"baseline", "fleetmirror"} {
		if !strings.Contains(c.modes, mode) {
			continue
		}
		if err := setMode(ctx, cl, mode); err != nil {
			return err
		}
		for _, img := range imgs {
			if err := rollout(ctx, cl, c, mode, img, res); err != nil {
				return err
			}
		}
	}
	files, err := res.WriteAll(c.out)
	if err != nil {
		return err
	}
	md, _ := os.ReadFile(files[1])
	fmt.Printf("%s\nwrote %v\n", md, files)
	return nil
}

// setMode runs the agents, or stops them and points containerd straight at
// the upstream.
func setMode(ctx context.Context, cl *cluster.Cluster, mode string) error {
	if mode == "fleetmirror" {
		if err := cl.StartAgents(ctx); err != nil {
			return err
		}
		return workload.WaitPeers(ctx, cl.Nodes)
	}
	if err := cl.StopAgents(); err != nil {
		return err
	}
	for _, n := range cl.Nodes {
		if err := n.WriteHostsTOML(cl.Upstream.Host(), cluster.UpstreamHostsTOML(cl.Upstream)); err != nil {
			return err
		}
	}
	return nil
}

func rollout(ctx context.Context, cl *cluster.Cluster, c config, mode string, img image, res *report.Results) error {
	all := cl.Nodes
	// create: every node pulls v1 at once.
	if strings.Contains(c.scenarios, "create") {
		if err := measure(ctx, cl, mode, "create", img.spec.Name, img.v1, [][]*cluster.Node{all}, c.stagger, res); err != nil {
			return err
		}
	}
	if !strings.Contains(c.scenarios, "update") {
		return purge(ctx, all, img)
	}
	// update: v1 everywhere, then v2 a batch at a time.
	size := batchSize(len(all), c.batch)
	var batches [][]*cluster.Node
	for i := 0; i < len(all); i += size {
		batches = append(batches, all[i:min(i+size, len(all))])
	}
	if err := measure(ctx, cl, mode, "update", img.spec.Name, img.v2, batches, 0, res); err != nil {
		return err
	}
	return purge(ctx, all, img)
}

// purge removes both versions of img from every node.
func purge(ctx context.Context, all []*cluster.Node, img image) error {
	for _, n := range all {
		for _, p := range []struct {
			ref string
			g   *cluster.GeneratedImage
		}{{img.v1, img.g1}, {img.v2, img.g2}} {
			if err := workload.Purge(ctx, n, p.ref, p.g); err != nil {
				return err
			}
		}
	}
	return nil
}

// measure pulls ref on each batch of nodes in turn, the nodes of a batch
// at once or spread over stagger, and records every pull (timed from its
// own start) and the bytes that moved.
func measure(ctx context.Context, cl *cluster.Cluster, mode, scenario, name, ref string, batches [][]*cluster.Node, stagger time.Duration, res *report.Results) error {
	cl.Upstream.Reset()
	peerBefore := peerBytes(ctx, cl, mode)
	waveBefore := waves(ctx, cl, mode)
	cpuBefore := map[*cluster.Node]float64{}
	for _, n := range cl.Nodes {
		cpuBefore[n] = workload.CPUSeconds(n.AgentPID())
	}
	for bi, batch := range batches {
		var wg sync.WaitGroup
		errs := make([]error, len(batch))
		pulls := make([]report.Pull, len(batch))
		for i, n := range batch {
			wg.Go(func() {
				if len(batch) > 1 {
					select {
					case <-time.After(stagger * time.Duration(i) / time.Duration(len(batch)-1)):
					case <-ctx.Done():
						errs[i] = ctx.Err()
						return
					}
				}
				d, err := n.Pull(ctx, ref)
				if err != nil {
					errs[i] = fmt.Errorf("%s %s %s on %s: %w\n%s", mode, scenario, ref, n.Name, err, n.LogTail(20))
					return
				}
				pulls[i] = report.Pull{Mode: mode, Scenario: scenario, Image: name, Node: n.Name, Batch: bi + 1, Duration: d}
			})
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				return err
			}
		}
		res.Pulls = append(res.Pulls, pulls...)
		if mode == "fleetmirror" {
			// A batch's nodes advertise before the next batch pulls, as a
			// rolling update waits for readiness before moving on.
			for _, n := range batch {
				if err := workload.WaitAdvertised(ctx, n, 2); err != nil {
					return err
				}
			}
		}
	}
	var up int64
	for _, cnt := range cl.Upstream.Stats().ByKind {
		up += cnt.Bytes
	}
	res.Traffic = append(res.Traffic, report.Traffic{Mode: mode, Scenario: scenario, Image: name,
		UpstreamBytes: up, PeerBytes: peerBytes(ctx, cl, mode) - peerBefore})
	if mode == "fleetmirror" {
		// What the agents cost: CPU seconds of the rollout and peak RSS.
		var cpu, peak float64
		for _, n := range cl.Nodes {
			cpu += workload.CPUSeconds(n.AgentPID()) - cpuBefore[n]
			peak = max(peak, workload.RSSMiB(n.AgentPID(), "VmHWM"))
		}
		fmt.Printf("%s %s %s: agent CPU %.2f s per node, peak RSS %.1f MiB (largest)\n", mode, scenario, name, cpu/float64(len(cl.Nodes)), peak)
		after := waves(ctx, cl, mode)
		var counts []string
		for _, o := range metrics.WaveOutcomes {
			counts = append(counts, fmt.Sprintf("%s %.0f", o, after[o]-waveBefore[o]))
		}
		fmt.Printf("%s %s %s: first wave blobs: %s\n", mode, scenario, name, strings.Join(counts, ", "))
	}
	fmt.Printf("%s %s %s: done\n", mode, scenario, name)
	return nil
}

// peerBytes is what all agents served their containerd from peers so far.
func peerBytes(ctx context.Context, cl *cluster.Cluster, mode string) int64 {
	if mode != "fleetmirror" {
		return 0
	}
	var total float64
	for _, n := range cl.Nodes {
		if s, err := n.Metrics(ctx); err == nil {
			total += s.Sum("fleetmirror_mirror_served_bytes_total", "source", "peer")
		}
	}
	return int64(total)
}

// waves is what the first wave did with blobs on all agents so far, by
// outcome; nothing when the agents do not run.
func waves(ctx context.Context, cl *cluster.Cluster, mode string) map[string]float64 {
	if mode != "fleetmirror" {
		return map[string]float64{}
	}
	out, err := cluster.FirstWave(ctx, cl.Nodes)
	if err != nil {
		fmt.Fprintln(os.Stderr, "rollout: first wave counts:", err)
		return map[string]float64{}
	}
	return out
}

func batchSize(nodes int, share float64) int {
	return max(1, int(math.Ceil(float64(nodes)*share)))
}

func rateString(r int64) string {
	if r <= 0 {
		return "unshaped"
	}
	return fmt.Sprintf("%d MB/s", r/1_000_000)
}

func numCPU() int { return runtime.NumCPU() }
