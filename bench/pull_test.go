// Package bench measures pulls the way users judge this system: real
// containerd nodes in network namespaces pulling through the CRI, against
// a registry on the same links, a shaped "internet" upstream, and peers.
//
//	make bench   (or: go test -run '^$' -bench . -benchtime 3x ./bench/)
//
// FLEETMIRROR_BENCH_IMAGES picks the images, e.g. "10MB/1,100MB/1,1GB/4";
// FLEETMIRROR_AGENT_ARGS adds agent flags. To profile both agents during
// the peer pulls, give "--debug-pprof" and FLEETMIRROR_BENCH_PROFILE=DIR:
// each peer run then saves 10 s of CPU profile per agent in DIR (give a
// -benchtime that keeps the pulls going that long).
// FLEETMIRROR_BENCH_KEEP=1 keeps the nodes' logs.
package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/bench/workload"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// The shaped upstream stands for an internet registry: 100 MB/s shared,
// 20 ms added per request (targets.md measures the same way).
const (
	shapedRate    = 100_000_000
	shapedLatency = 20 * time.Millisecond
)

func benchImages(b *testing.B) []workload.Spec {
	spec := os.Getenv("FLEETMIRROR_BENCH_IMAGES")
	if spec == "" {
		spec = "10MB/1,100MB/1,1GB/4"
	}
	specs, err := workload.ParseSpecs(spec)
	if err != nil {
		b.Fatalf("FLEETMIRROR_BENCH_IMAGES: %v", err)
	}
	return specs
}

var (
	once    sync.Once
	shared  *cluster.Cluster
	initErr error
)

// benchCluster is one 3-node cluster (containerd 2.x) for the whole run:
// node 1 seeds peers, node 2 pulls through its agent, node 3 has no agent
// and pulls straight from the registry, the baseline.
func benchCluster(b *testing.B) *cluster.Cluster {
	once.Do(func() {
		bin := os.Getenv("FLEETMIRROR_AGENT")
		if bin == "" {
			initErr = fmt.Errorf("FLEETMIRROR_AGENT is not set: run `make bench`")
			return
		}
		ctx := context.Background()
		keep := os.Getenv("FLEETMIRROR_BENCH_KEEP") != ""
		shared, initErr = cluster.Start(ctx, cluster.Options{Nodes: 3, AgentBin: bin, AgentArgs: strings.Fields(os.Getenv("FLEETMIRROR_AGENT_ARGS")), KeepDir: keep})
		if initErr != nil {
			return
		}
		n3 := shared.Node(3)
		if initErr = n3.StopAgent(); initErr != nil {
			return
		}
		if keep {
			fmt.Fprintf(os.Stderr, "keeping the nodes' logs in %s\n", shared.Dir)
		}
		initErr = n3.WriteHostsTOML(shared.Upstream.Host(), cluster.UpstreamHostsTOML(shared.Upstream))
	})
	if initErr != nil {
		b.Fatal(initErr)
	}
	return shared
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		shared.Close()
	}
	os.Exit(code)
}

// BenchmarkPull pulls each image on a node that does not have it, from the
// unshaped registry on the same links, from a peer, and from the shaped
// upstream. Each iteration removes the image first.
func BenchmarkPull(b *testing.B) {
	c := benchCluster(b)
	ctx := context.Background()
	n1, n2, n3 := c.Node(1), c.Node(2), c.Node(3)
	for i, bi := range benchImages(b) {
		g, err := cluster.GenerateImage(int64(1000+i), bi.Size, bi.Layers)
		if err != nil {
			b.Fatal(err)
		}
		ref := c.Upstream.Ref("bench/" + strings.ToLower(bi.Name) + ":v1")
		if err := c.Upstream.Push(ctx, ref, g.Image); err != nil {
			b.Fatal(err)
		}
		if _, err := n1.Pull(ctx, ref); err != nil {
			b.Fatal(err)
		}
		waitAdvertised(b, n1, g.Digests())

		b.Run(bi.Name+"/local-registry", func(b *testing.B) {
			c.Upstream.SetShaping(0, 0)
			pullLoop(b, n3, ref, g)
		})
		b.Run(bi.Name+"/peer", func(b *testing.B) {
			c.Upstream.SetShaping(0, 0)
			c.Upstream.Reset()
			cpu1, cpu2 := workload.CPUSeconds(n1.AgentPID()), workload.CPUSeconds(n2.AgentPID())
			profiled := profileAgents(b, bi.Name, n1, n2)
			defer profiled()
			pullLoop(b, n2, ref, g)
			st := c.Upstream.Stats()
			var reqs int64
			for _, cnt := range st.ByClient[n2.IP] {
				reqs += cnt.Requests
			}
			gb := float64(bi.Size) * float64(b.N) / 1e9
			b.ReportMetric(float64(reqs)/float64(b.N), "upstream-req/op")
			b.ReportMetric((workload.CPUSeconds(n1.AgentPID())-cpu1)/gb, "server-cpu-s/GB")
			b.ReportMetric((workload.CPUSeconds(n2.AgentPID())-cpu2)/gb, "client-cpu-s/GB")
			b.ReportMetric(workload.RSSMiB(n1.AgentPID(), "VmHWM"), "server-peak-MiB")
			b.ReportMetric(workload.RSSMiB(n2.AgentPID(), "VmHWM"), "client-peak-MiB")
		})
		b.Run(bi.Name+"/shaped-upstream", func(b *testing.B) {
			c.Upstream.SetShaping(shapedRate, shapedLatency)
			defer c.Upstream.SetShaping(0, 0)
			pullLoop(b, n3, ref, g)
		})
		// Free the seed's disk and the next image's page cache.
		for _, n := range []*cluster.Node{n1, n2, n3} {
			removeImage(b, n, ref, g)
		}
	}
}

func pullLoop(b *testing.B, n *cluster.Node, ref string, g *cluster.GeneratedImage) {
	ctx := context.Background()
	b.SetBytes(g.Manifest.Size + g.Config.Size + sumLayers(g))
	for b.Loop() {
		b.StopTimer()
		removeImage(b, n, ref, g)
		// Each pull writes its layers twice (content and snapshot); without
		// this the next pull competes with the last one's writeback, and
		// whichever mode runs first after another pays for it.
		syscall.Sync()
		b.StartTimer()
		if _, err := n.Pull(ctx, ref); err != nil {
			b.Fatalf("pull on %s: %v\n%s", n.Name, err, n.LogTail(20))
		}
	}
	b.StopTimer()
	if err := n.VerifyContent(ctx, g.Digests()); err != nil {
		b.Fatal(err)
	}
}

// profileAgents saves the nodes' agents' CPU profiles, taken while the
// benchmark runs, when FLEETMIRROR_BENCH_PROFILE names a directory. The
// returned func waits for them.
func profileAgents(b *testing.B, name string, nodes ...*cluster.Node) func() {
	dir := os.Getenv("FLEETMIRROR_BENCH_PROFILE")
	if dir == "" {
		return func() {}
	}
	var wg sync.WaitGroup
	for _, n := range nodes {
		path := filepath.Join(dir, fmt.Sprintf("%s-%s.cpu.pprof", name, n.Name))
		url := pprofURL(n, "profile?seconds=10")
		wg.Go(func() { saveProfile(b, url, path) })
	}
	return wg.Wait
}

func sumLayers(g *cluster.GeneratedImage) int64 {
	var s int64
	for _, l := range g.Layers {
		s += l.Size
	}
	return s
}

func removeImage(b *testing.B, n *cluster.Node, ref string, g *cluster.GeneratedImage) {
	if err := workload.Purge(context.Background(), n, ref, g); err != nil {
		b.Fatal(err)
	}
}

func waitAdvertised(b *testing.B, n *cluster.Node, ds []digest.Digest) {
	if err := workload.WaitAdvertised(context.Background(), n, len(ds)); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkMiss times what a miss costs containerd: a request for content
// no node has, answered 404 by the agent after its lookup.
func BenchmarkMiss(b *testing.B) {
	c := benchCluster(b)
	n2 := c.Node(2)
	// From the node itself, as its containerd asks.
	client := n2.LocalClient()
	// A manifest miss costs at most the resolve timeout; a blob miss also
	// the first wave's quiet window (a fifth of --burst-settle), in which
	// nodes missing the same blob find each other.
	for _, kind := range []string{"manifests", "blobs"} {
		b.Run(kind, func(b *testing.B) {
			var lat []time.Duration
			i := 0
			for b.Loop() {
				i++
				d, status := cluster.TimeGetWith(context.Background(), client,
					n2.LocalRegistryURL()+"/v2/bench/none/"+kind+"/"+digest.FromString(fmt.Sprint("miss", i, time.Now().UnixNano())).String()+"?ns="+c.Upstream.Host())
				if status != 404 {
					b.Fatalf("miss answered %d, want 404", status)
				}
				lat = append(lat, d)
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
			b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
			b.ReportMetric(workload.RSSMiB(n2.AgentPID(), "VmRSS"), "agent-rss-MiB")
		})
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
