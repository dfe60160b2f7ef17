package routing

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// Claims of real libp2p hosts land on every agent within a settle window:
// each claimant lists all the others, and nobody lists a node that did not
// claim.
func TestClaimsReachEveryClaimant(t *testing.T) {
	port, lns := reserve(t, 5)
	boot := StaticBootstrapper{Entries: []string{lns[0].Addr().String()}}
	var nodes []*node
	for _, ln := range lns {
		nodes = append(nodes, startNode(t, ln, port, boot))
	}
	waitJoined(t, nodes...)
	waitFor(t, 10*time.Second, "full routing tables", func() bool {
		for _, n := range nodes {
			if n.dht.RoutingTable().Size() < len(nodes)-1 {
				return false
			}
		}
		return true
	})
	claimants := nodes[:4] // the fifth does not miss the blob
	const key = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
	var wg sync.WaitGroup
	for _, n := range claimants {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			if err := n.Claim(ctx, Want, key); err != nil {
				t.Errorf("%s claim: %v", n.ip, err)
			}
		})
	}
	wg.Wait()
	for _, n := range claimants {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		found, err := n.Claimants(ctx, Want, key)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, c := range found {
			ids = append(ids, c.ID)
		}
		for _, o := range claimants {
			if o != n && !slices.Contains(ids, o.Self()) {
				t.Errorf("%s does not see the claim of %s (sees %v)", n.ip, o.ip, found)
			}
		}
		if slices.Contains(ids, nodes[4].Self()) || slices.Contains(ids, n.Self()) {
			t.Errorf("%s lists a node that did not claim, or itself: %v", n.ip, found)
		}
	}
}
