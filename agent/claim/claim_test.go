package claim

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// Nodes that miss a key together agree on exactly one fetcher, and every
// other one follows it; a node alone fetches itself.
func TestDecide(t *testing.T) {
	for _, n := range []int{1, 2, 5} {
		newCluster(n).burst(t, "sha256:abc", "", nil)
	}
}

// The score orders nodes the same way for everyone and differently per
// image, so one node does not fetch every image of a burst.
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
		if _, follow := New(rs[0], 50*time.Millisecond, nil).Decide(context.Background(), key, ""); follow {
			t.Fatalf("%s: a lone node follows someone", key)
		}
		for _, r := range rs[1:] {
			leader, follow := New(r, 50*time.Millisecond, nil).Decide(context.Background(), key, "")
			if !follow || leader != a {
				t.Errorf("%s: a late node follows %v (%v), want the fetcher %s", key, leader, follow, a)
			}
		}
	}
}

// splitView hides one node's claims from this node until a moment, as
// claims that miss the settle window on a busy node arrive late.
type splitView struct {
	routing.Claims
	hide  string
	until time.Time
}

func (s splitView) Claimants(ctx context.Context, kind routing.ClaimKind, key string) ([]routing.Claimant, error) {
	cs, err := s.Claims.Claimants(ctx, kind, key)
	if time.Now().After(s.until) {
		return cs, err
	}
	var out []routing.Claimant
	for _, c := range cs {
		if c.ID != s.hide {
			out = append(out, c)
		}
	}
	return out, err
}

// Two nodes of a burst that did not see each other's want claims both pick
// themselves; the second look at the fetch claims leaves one fetcher (the
// one of the higher score, or the one that announced first if the other
// saw it in time), and the other follows it.
func TestSplitViewsLeaveOneFetcher(t *testing.T) {
	addrs := []netip.AddrPort{
		netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:1"), netip.MustParseAddrPort("10.0.0.3:1"),
	}
	// A key for which nodes 1 and 2 both outrank node 3, so each of them
	// picks itself when it does not see the other.
	key := ""
	for i := 0; key == ""; i++ {
		k := "sha256:" + string(rune('a'+i%26)) + string(rune(i))
		s3 := string(score(k, addrs[2].String()))
		if string(score(k, addrs[0].String())) > s3 && string(score(k, addrs[1].String())) > s3 {
			key = k
		}
	}
	rs := routing.NewMemory(addrs...)
	// Node 3 wants it too: a burst.
	if err := rs[2].Claim(context.Background(), routing.Want, key); err != nil {
		t.Fatal(err)
	}
	// Each sees the other's claims only after both decided (a settle
	// window), before the second look (two).
	settle := 50 * time.Millisecond
	until := time.Now().Add(settle * 3 / 2)
	views := []routing.Claims{splitView{rs[0], addrs[1].String(), until}, splitView{rs[1], addrs[0].String(), until}}
	leaders := make([]netip.AddrPort, 2)
	follows := make([]bool, 2)
	var wg sync.WaitGroup
	for i, v := range views {
		wg.Go(func() { leaders[i], follows[i] = New(v, settle, nil).Decide(context.Background(), key, "") })
	}
	wg.Wait()
	if follows[0] == follows[1] {
		t.Fatalf("follow %v: want exactly one of the two to fetch", follows)
	}
	fetcher, follower := 0, 1
	if follows[0] {
		fetcher, follower = 1, 0
	}
	if leaders[follower] != addrs[fetcher] {
		t.Errorf("node %d follows %s, want the fetcher, node %d", follower+1, leaders[follower], fetcher+1)
	}
}

// The nodes of a burst that miss the layers of one image at once agree on
// one fetcher for all of them: a fetcher per layer deadlocks containerd
// 2.x's pull slots (see Decide).
func TestOneFetcherPerImage(t *testing.T) {
	var addrs []netip.AddrPort
	for i := range 5 {
		addrs = append(addrs, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i)))
	}
	rs := routing.NewMemory(addrs...)
	layers := []string{"sha256:l1", "sha256:l2", "sha256:l3", "sha256:l4"}
	fetchers := make([][]bool, len(layers))
	var wg sync.WaitGroup
	for l, key := range layers {
		fetchers[l] = make([]bool, len(addrs))
		for i := range addrs {
			wg.Go(func() {
				_, follow := New(rs[i], 50*time.Millisecond, nil).Decide(context.Background(), key, "registry.example/team/app")
				fetchers[l][i] = !follow
			})
		}
	}
	wg.Wait()
	for l := range layers {
		for i := range addrs {
			if fetchers[l][i] != fetchers[0][i] {
				t.Fatalf("fetchers per layer %v: want the same node for every layer of the image", fetchers)
			}
		}
	}
}

// slowWants answers want listings late, as a busy node's DHT does.
type slowWants struct {
	routing.Claims
	delay time.Duration
}

func (s slowWants) Claimants(ctx context.Context, kind routing.ClaimKind, key string) ([]routing.Claimant, error) {
	if kind == routing.Want {
		time.Sleep(s.delay)
	}
	return s.Claims.Claimants(ctx, kind, key)
}

// A node whose listing of the claims is slow follows a node that decided
// to fetch meanwhile, even one of lower score, instead of fetching too.
func TestSlowNodeFollowsAFetcherThatDecidedMeanwhile(t *testing.T) {
	addrs := []netip.AddrPort{
		netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:1"), netip.MustParseAddrPort("10.0.0.3:1"),
	}
	// A group in which node 1 outranks node 2, which outranks node 3.
	group := ""
	for i := 0; group == ""; i++ {
		g := "registry.example/app" + string(rune('a'+i%26)) + string(rune(i))
		s1, s2, s3 := string(score(g, addrs[0].String())), string(score(g, addrs[1].String())), string(score(g, addrs[2].String()))
		if s1 > s2 && s2 > s3 {
			group = g
		}
	}
	rs := routing.NewMemory(addrs...)
	key := "sha256:layer"
	if err := rs[2].Claim(context.Background(), routing.Want, key); err != nil {
		t.Fatal(err)
	}
	settle := 50 * time.Millisecond
	var leader netip.AddrPort
	var follow1, follow2 bool
	var wg sync.WaitGroup
	wg.Go(func() {
		leader, follow1 = New(slowWants{rs[0], 100 * time.Millisecond}, settle, nil).Decide(context.Background(), key, group)
	})
	wg.Go(func() {
		// Node 2 misses node 1's want claim and decides while node 1 lists.
		time.Sleep(80 * time.Millisecond)
		_, follow2 = New(splitView{rs[1], addrs[0].String(), time.Now().Add(time.Hour)}, settle, nil).Decide(context.Background(), key, group)
	})
	wg.Wait()
	if follow2 {
		t.Fatal("node 2 follows: the test did not set up two fetchers")
	}
	if !follow1 || leader != addrs[1] {
		t.Errorf("node 1 follows %v (%s); want it to follow node 2, which fetches", follow1, leader)
	}
}

// countingClaims counts the want listings of one node: an agreement lists
// the other nodes that want the key, a node that keeps fetching its group
// does not.
type countingClaims struct {
	routing.Claims
	mu    sync.Mutex
	wants int
}

func (c *countingClaims) Claimants(ctx context.Context, kind routing.ClaimKind, key string) ([]routing.Claimant, error) {
	if kind == routing.Want {
		c.mu.Lock()
		c.wants++
		c.mu.Unlock()
	}
	return c.Claims.Claimants(ctx, kind, key)
}

func (c *countingClaims) wantListings() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wants
}

// cluster is n nodes that share their claims, each with its Decider.
type cluster struct {
	addrs    []netip.AddrPort
	counts   []*countingClaims
	deciders []*Decider
}

func newCluster(n int) *cluster {
	c := &cluster{}
	for i := range n {
		c.addrs = append(c.addrs, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i)))
	}
	for _, r := range routing.NewMemory(c.addrs...) {
		cc := &countingClaims{Claims: r}
		c.counts = append(c.counts, cc)
		c.deciders = append(c.deciders, New(cc, 50*time.Millisecond, nil))
	}
	return c
}

// burst has every node decide key at once (after before, if set, on the
// same node): exactly one fetches, and it returns which one, after
// checking that the others follow it.
func (c *cluster) burst(t *testing.T, key, group string, before func(*Decider)) int {
	t.Helper()
	follows := make([]netip.AddrPort, len(c.deciders))
	fetches := make([]bool, len(c.deciders))
	var wg sync.WaitGroup
	for i, d := range c.deciders {
		wg.Go(func() {
			if before != nil {
				before(d)
			}
			// As the registry does: the image's fetcher first, if it has one
			// (it is asked, and serves the blob as it fetches it).
			if f, ok := d.ImageFetcher(context.Background(), group); ok {
				follows[i] = f
				return
			}
			leader, follow := d.Decide(context.Background(), key, group)
			follows[i], fetches[i] = leader, !follow
		})
	}
	wg.Wait()
	fetcher := -1
	for i, f := range fetches {
		if f {
			if fetcher >= 0 {
				t.Fatalf("%s: nodes %d and %d both fetch", key, fetcher, i)
			}
			fetcher = i
		}
	}
	if fetcher < 0 {
		t.Fatalf("%s: nobody fetches", key)
	}
	// Without an image's agreement every node follows the fetcher. With
	// one, a node may follow one that follows the fetcher (it serves what
	// it receives in flight); every chain ends at the fetcher.
	for i, f := range follows {
		if before == nil && i != fetcher && f != c.addrs[fetcher] {
			t.Errorf("%s: node %d follows %s, want the fetcher %s", key, i, f, c.addrs[fetcher])
		}
	}
	for i := range follows {
		at := i
		for hops := 0; at != fetcher; hops++ {
			next := slices.Index(c.addrs, follows[at])
			if next < 0 || hops == len(follows) {
				t.Fatalf("%s: node %d follows %v, which leads to no fetcher (the fetcher is %s)", key, i, follows, c.addrs[fetcher])
			}
			at = next
		}
	}
	return fetcher
}

// The node the image's agreement picked fetches each of its blobs
// without another agreement, and the others follow it there; a blob of
// another image is agreed on anew, and a node that picks itself for a
// blob does not become the image's fetcher.
func TestFetcherKeepsTheImage(t *testing.T) {
	c := newCluster(4)
	first := c.burst(t, "sha256:config", "example.com/app", func(d *Decider) {
		d.Begin("example.com/app:v1", "example.com/app")
	})
	before := c.counts[first].wantListings()
	if second := c.burst(t, "sha256:layer", "example.com/app", nil); second != first {
		t.Fatalf("the image's layer is fetched by node %d, its config by node %d", second, first)
	}
	if got := c.counts[first].wantListings(); got != before {
		t.Errorf("the image's fetcher listed the wants of its layer %d times, want none (no new agreement)", got-before)
	}
	other := c.burst(t, "sha256:other", "example.com/other", nil)
	before = c.counts[other].wantListings()
	c.burst(t, "sha256:other2", "example.com/other", nil)
	if c.counts[other].wantListings() == before {
		t.Error("a node that picked itself for one blob skipped the agreement on the next: only the image's agreement makes a node its fetcher")
	}
}

// Begin, on the manifest miss, agrees on the image's fetcher ahead of its
// blobs: a blob asked for while that runs waits for it, and the node it
// picked fetches the blob without an agreement of its own.
func TestBeginAgreesAhead(t *testing.T) {
	c := newCluster(4)
	fetcher := c.burst(t, "sha256:layer", "example.com/app", func(d *Decider) {
		d.Begin("example.com/app:v1", "example.com/app")
	})
	if got := c.counts[fetcher].wantListings(); got > 2 {
		t.Errorf("the fetcher listed wants %d times: the manifest's agreement (up to 2) and then the layer's too", got)
	}
	for i, d := range c.deciders {
		self, f, ok := d.answer("example.com/app")
		if !ok || self != (i == fetcher) || !self && f != c.addrs[fetcher] {
			t.Errorf("node %d: answer (fetches %v, follows %s, ok %v), want the image's fetcher %s", i, self, f, ok, c.addrs[fetcher])
		}
	}
}

// One pull misses its tag and then its manifest, under two keys; under
// load the second miss comes after the first agreement ended. It starts
// no second one, in which a node that agreed to follow would find itself
// alone and become a second fetcher of the image.
func TestOneAgreementPerPull(t *testing.T) {
	c := newCluster(4)
	beginAll(c.deciders, "example.com/app:v1", "example.com/app")
	for _, d := range c.deciders[1:] {
		d.Begin("sha256:manifest", "example.com/app")
		d.awaitBegun(context.Background(), "example.com/app")
	}
	fetchers := 0
	for _, d := range c.deciders {
		if d.fetchesImage("example.com/app") {
			fetchers++
		}
	}
	if fetchers != 1 {
		t.Errorf("%d nodes fetch the image, want 1", fetchers)
	}
}

// The followers of an image's agreement are told which node fetches it; a
// new tag of the repository is agreed on anew by the nodes that pull it,
// while a digest right after the tag is the same pull.
func TestImageFetcherPerTag(t *testing.T) {
	c := newCluster(4)
	fetchers := func(ds []*Decider) (self []int, follow []netip.AddrPort) {
		for i, d := range ds {
			if d.fetchesImage("example.com/app") {
				self = append(self, i)
			} else if f, ok := d.ImageFetcher(context.Background(), "example.com/app"); ok {
				follow = append(follow, f)
			}
		}
		return self, follow
	}
	beginAll(c.deciders, "example.com/app:v1", "example.com/app")
	beginAll(c.deciders, "sha256:manifest-v1", "example.com/app")
	self, follow := fetchers(c.deciders)
	if len(self) != 1 || len(follow) != 3 {
		t.Fatalf("v1: %d fetchers and %d followers, want 1 and 3", len(self), len(follow))
	}
	for _, f := range follow {
		if f != c.addrs[self[0]] {
			t.Errorf("v1: a follower is told %s fetches, want %s", f, c.addrs[self[0]])
		}
	}
	// Two other nodes pull v2 (a rolling update): they agree between them.
	var pair []*Decider
	for i, d := range c.deciders {
		if i != self[0] && len(pair) < 2 {
			pair = append(pair, d)
		}
	}
	beginAll(pair, "example.com/app:v2", "example.com/app")
	self2, follow2 := fetchers(pair)
	if len(self2) != 1 || len(follow2) != 1 {
		t.Fatalf("v2: %d fetchers and %d followers among the two that pull it, want 1 and 1", len(self2), len(follow2))
	}
}

// deafClaims hears no peer within a settle window, as a node starved of
// CPU; given longer, it hears them.
type deafClaims struct {
	routing.Claims
	settle time.Duration
}

func (c deafClaims) Claimants(ctx context.Context, kind routing.ClaimKind, key string) ([]routing.Claimant, error) {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= c.settle {
		<-ctx.Done()
		return nil, routing.ErrNoAnswer
	}
	return c.Claims.Claimants(ctx, kind, key)
}

// A node that hears no peer in time asks again for longer before it takes
// itself for the only one that missed a blob: else it fetches it besides
// the burst's fetcher. Either node may be the deaf one (which one the
// scores favour decides whether the deaf one would pick itself).
func TestNoAnswerIsNotAlone(t *testing.T) {
	const settle = 50 * time.Millisecond
	for deaf := range 2 {
		addrs := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:1")}
		rs := routing.NewMemory(addrs...)
		var ds []*Decider
		for i, r := range rs {
			var c routing.Claims = r
			if i == deaf {
				c = deafClaims{Claims: r, settle: settle}
			}
			ds = append(ds, New(c, settle, nil))
		}
		fetches := make([]bool, 2)
		var wg sync.WaitGroup
		for i, d := range ds {
			wg.Go(func() {
				_, follow := d.Decide(context.Background(), "sha256:abc", "example.com/app")
				fetches[i] = !follow
			})
		}
		wg.Wait()
		if fetches[0] == fetches[1] {
			t.Errorf("node %d deaf: fetchers %v, want exactly one", deaf, fetches)
		}
	}
}

// Each node remembers the manifests its containerd missed in the pull,
// by digest (not the tag), once each, so that it can tell which blobs it
// will hold; the list is bounded.
func TestImageManifests(t *testing.T) {
	c := newCluster(3)
	beginAll(c.deciders, "example.com/app:v1", "example.com/app")
	index, manifest := digest.FromString("index"), digest.FromString("manifest")
	for i, d := range c.deciders {
		d.Begin(index.String(), "example.com/app")
		d.Begin(manifest.String(), "example.com/app")
		d.Begin(index.String(), "example.com/app") // containerd asked again
		if got := d.ImageManifests("example.com/app"); !slices.Equal(got, []digest.Digest{index, manifest}) {
			t.Errorf("node %d names manifests %v, want the index and the manifest once each", i, got)
		}
	}
	d := c.deciders[0]
	for k := range 2 * maxManifests {
		d.Begin(digest.FromString(fmt.Sprint(k)).String(), "example.com/app")
	}
	if n := len(d.ImageManifests("example.com/app")); n != maxManifests {
		t.Errorf("after %d more manifests a node names %d, want %d (the bound)", 2*maxManifests, n, maxManifests)
	}
	if got := d.ImageManifests("example.com/other"); got != nil {
		t.Errorf("a repository this node does not pull names manifests %v", got)
	}
}

// beginAll has ds miss key of group at once, as a burst's pulls do, and
// waits for their agreements to end.
func beginAll(ds []*Decider, key, group string) {
	var wg sync.WaitGroup
	for _, d := range ds {
		wg.Go(func() { d.Begin(key, group) })
	}
	wg.Wait()
	for _, d := range ds {
		d.awaitBegun(context.Background(), group)
	}
}
