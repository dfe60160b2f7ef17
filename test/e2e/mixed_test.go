package e2e

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// TestMixedVersions runs agents of two adjacent versions in one cluster, as
// a rolling update does: the previous release's agent (built by `make
// agent-prev` from PREV_AGENT_REF) on nodes 1 and 2, this one on nodes 3
// and 4. Each serves the other, and a burst across both kinds completes.
func TestMixedVersions(t *testing.T) {
	prev := os.Getenv("FLEETMIRROR_AGENT_PREV")
	if prev == "" {
		t.Fatal("FLEETMIRROR_AGENT_PREV is not set: run `make e2e`, which builds bin/agent-prev")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the e2e suite needs root for network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := startCluster(t, ctx, cluster.Options{Nodes: 4, Containerd: "2", Logf: t.Logf})
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
	t.Run("a burst across both versions completes", func(t *testing.T) { e.pullAll(t, c.Nodes, burst) })
}
