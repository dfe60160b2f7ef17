package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// prevAgent returns the previous release's agent binary and a context
// for a test that runs it.
func prevAgent(t *testing.T) (string, context.Context) {
	prev := os.Getenv("FLEETMIRROR_AGENT_PREV")
	if prev == "" {
		t.Fatal("FLEETMIRROR_AGENT_PREV is not set: run `make e2e`, which builds bin/agent-prev")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the e2e suite needs root for network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return prev, ctx
}

// TestMixedVersions runs agents of two adjacent versions in one cluster, as
// a rolling update does: the previous release's agent (built by `make
// agent-prev` from PREV_AGENT_REF) on nodes 1 and 2, this one on nodes 3
// and 4. Each serves the other, and a burst across both kinds completes,
// the new agents still fetching each layer once between them.
// Both run an open network here: an agent with the network key serves
// only members (see TestRollingTrust for the way there).
func TestMixedVersions(t *testing.T) {
	prev, ctx := prevAgent(t)
	c := startCluster(t, ctx, cluster.Options{Nodes: 4, Containerd: "2", Logf: t.Logf, OpenNetwork: true})
	for i, n := range c.Nodes {
		n.AgentBin = agentBin(t)
		if i < 2 {
			n.AgentBin = prev
		}
	}
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, c: c}
	old1, old2, new3, new4 := c.Node(1), c.Node(2), c.Node(3), c.Node(4)

	// Layers above mirror.WholeBelow, so the new agents stream them.
	fromOld := e.image(11, 24<<20, 2, "mixed/from-old:v1")
	fromNew := e.image(12, 24<<20, 2, "mixed/from-new:v1")
	burst := e.image(13, 24<<20, 2, "mixed/burst:v1")

	peerPull := func(t *testing.T, src, dst *cluster.Node, img image) {
		e.pull(t, src, img.ref, img)
		e.waitAdvertised(t, src, img)
		c.Upstream.Reset()
		e.pull(t, dst, img.ref, img)
		if got := c.Upstream.Stats().FromClient(dst.IP, "GET", "blob").Requests; got != 0 {
			t.Errorf("%s fetched %d blobs upstream; %s holds them", dst.Name, got, src.Name)
		}
	}
	t.Run("previous agent serves the new one", func(t *testing.T) { peerPull(t, old1, new3, fromOld) })
	t.Run("new agent serves the previous one", func(t *testing.T) { peerPull(t, new4, old2, fromNew) })
	t.Run("a burst across both versions completes", func(t *testing.T) {
		c.Upstream.Reset()
		before := e.firstWave(t)
		e.pullAll(t, c.Nodes, burst)
		// The new agents agree among themselves, the previous ones in the
		// DHT take no part: at most one new agent fetches each layer (none,
		// if a previous one finished it first), and each previous agent
		// may fetch each layer itself.
		after := e.firstWave(t)
		if got := after[metrics.WaveFetched] - before[metrics.WaveFetched]; got > float64(len(burst.Layers)) {
			t.Errorf("first wave: the new agents fetched %v blobs upstream by agreement, want at most %d (one per layer); before %v, after %v", got, len(burst.Layers), before, after)
		}
		st := c.Upstream.Stats()
		for _, l := range burst.Layers {
			if got := st.BlobGets[l.Digest.String()]; got < 1 || got > 1+2 {
				t.Errorf("layer %s was fetched upstream %d times, want once for the new agents and at most once for each of the 2 previous ones", l.Digest, got)
			}
		}
	})
}

// TestRollingTrust rolls a cluster of open agents of the previous release
// over to members-only agents, one node at a time as a DaemonSet update
// does, and then rotates the network key the same way (h and g of the
// trust issue). Pulls run on every node throughout and none may fail:
// during each roll the two kinds cannot reach each other, so a node pulls
// from the peers of its own kind or from upstream.
func TestRollingTrust(t *testing.T) {
	prev, ctx := prevAgent(t)
	c := startCluster(t, ctx, cluster.Options{Nodes: 4, Containerd: "2", Logf: t.Logf})
	for _, n := range c.Nodes {
		n.AgentBin = prev
	}
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, c: c}
	var load []image
	for i := range 4 {
		load = append(load, e.image(int64(40+i), 6<<20, 2, fmt.Sprintf("rolling/load%d:v1", i)))
	}

	// pulls pulls the load images round the nodes until stopped, removing
	// each image again so that the next round pulls it anew.
	pulls := func(t *testing.T) (stop func()) {
		done := make(chan struct{})
		var wg sync.WaitGroup
		var count atomic.Int64
		for i, n := range c.Nodes {
			wg.Go(func() {
				for k := i; ; k++ {
					select {
					case <-done:
						return
					default:
					}
					img := load[k%len(load)]
					pctx, pcancel := context.WithTimeout(ctx, time.Minute)
					_, err := n.Pull(pctx, img.ref)
					pcancel()
					if err != nil {
						t.Errorf("%s: pull %s during the roll: %v", n.Name, img.ref, err)
						return
					}
					count.Add(1)
					_ = n.RemoveImage(ctx, img.ref)
				}
			})
		}
		return func() {
			close(done)
			wg.Wait()
			t.Logf("%d pulls during the roll, none failed", count.Load())
		}
	}
	roll := func(t *testing.T, change func(n *cluster.Node)) {
		stop := pulls(t)
		for _, n := range c.Nodes {
			if err := n.StopAgent(); err != nil {
				t.Fatal(err)
			}
			change(n)
			if err := n.StartAgent(ctx); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second) // pulls meet the mixed cluster
		}
		stop()
	}
	peersServe := func(t *testing.T, seed int64) {
		img := e.image(seed, 8<<20, 2, fmt.Sprintf("rolling/after%d:v1", seed))
		e.pull(t, c.Node(1), img.ref, img)
		e.waitAdvertised(t, c.Node(1), img)
		c.Upstream.Reset()
		e.pull(t, c.Node(3), img.ref, img)
		if got := c.Upstream.Stats().FromClient(c.Node(3).IP, "GET", "blob").Requests; got != 0 {
			t.Errorf("%s fetched %d blobs upstream after the roll; node 1 holds them", c.Node(3).Name, got)
		}
	}

	t.Run("h/open agents roll over to members-only ones, no pull fails", func(t *testing.T) {
		roll(t, func(n *cluster.Node) { n.AgentBin = agentBin(t) })
		peersServe(t, 50)
	})
	t.Run("g/the key rotates with a rolling restart, no pull fails", func(t *testing.T) {
		key := filepath.Join(c.Dir, "rotated.key")
		if err := cluster.WriteNetworkKey(key); err != nil {
			t.Fatal(err)
		}
		roll(t, func(n *cluster.Node) { n.KeyFile = key })
		peersServe(t, 51)
	})
}
