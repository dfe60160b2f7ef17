package claim

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// Nodes that miss a key together agree on exactly one fetcher, and every
// other one follows it; a node alone fetches itself.
func TestDecide(t *testing.T) {
	for _, n := range []int{1, 2, 5} {
		var addrs []netip.AddrPort
		for i := range n {
			addrs = append(addrs, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i)))
		}
		rs := routing.NewMemory(addrs...)
		follows := make([]netip.AddrPort, n)
		fetches := make([]bool, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				d := New(rs[i], 50*time.Millisecond, nil)
				leader, follow := d.Decide(context.Background(), "sha256:abc")
				follows[i], fetches[i] = leader, !follow
			})
		}
		wg.Wait()
		fetcher := -1
		for i, f := range fetches {
			if f {
				if fetcher >= 0 {
					t.Fatalf("%d nodes: nodes %d and %d both fetch", n, fetcher, i)
				}
				fetcher = i
			}
		}
		if fetcher < 0 {
			t.Fatalf("%d nodes: nobody fetches", n)
		}
		for i, l := range follows {
			if i != fetcher && l != addrs[fetcher] {
				t.Errorf("%d nodes: node %d follows %s, want the fetcher %s", n, i, l, addrs[fetcher])
			}
		}
	}
}

// The score orders nodes the same way for everyone and differently per key,
// so one node does not fetch every blob of a burst.
func TestScoreSpreadsKeys(t *testing.T) {
	ids := []string{"a", "b", "c", "d"}
	wins := map[string]int{}
	for k := range 400 {
		key := "sha256:" + string(rune('a'+k%26)) + string(rune(k))
		best := ""
		for _, id := range ids {
			if best == "" || string(score(key, id)) > string(score(key, best)) {
				best = id
			}
		}
		wins[best]++
	}
	for _, id := range ids {
		if wins[id] < 50 {
			t.Errorf("node %s fetches %d of 400 keys: the load is not spread", id, wins[id])
		}
	}
}

// A node that misses a key after another decided to fetch it follows that
// one, whatever the scores say.
func TestLateNodeFollowsTheFetcher(t *testing.T) {
	a := netip.MustParseAddrPort("10.0.0.1:1")
	rs := routing.NewMemory(a, netip.MustParseAddrPort("10.0.0.2:1"), netip.MustParseAddrPort("10.0.0.3:1"))
	for _, key := range []string{"sha256:a", "sha256:b", "sha256:c", "sha256:d"} {
		if _, follow := New(rs[0], 50*time.Millisecond, nil).Decide(context.Background(), key); follow {
			t.Fatalf("%s: a lone node follows someone", key)
		}
		for _, r := range rs[1:] {
			leader, follow := New(r, 50*time.Millisecond, nil).Decide(context.Background(), key)
			if !follow || leader != a {
				t.Errorf("%s: a late node follows %v (%v), want the fetcher %s", key, leader, follow, a)
			}
		}
	}
}
