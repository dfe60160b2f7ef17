package routing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multihash"
	"go.uber.org/goleak"
)

// All traffic in these tests stays on 127.0.0.0/8: every node gets its own
// loopback IP (127.0.0.N) and all registries share one port, like agents on
// separate nodes of a cluster.

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func withBootstrapTiming(minBackoff, maxBackoff, refresh time.Duration) Option {
	return func(c *p2pConfig) {
		c.bootstrapMinBackoff, c.bootstrapMaxBackoff, c.bootstrapRefresh = minBackoff, maxBackoff, refresh
	}
}

func testLogger() *slog.Logger {
	if testing.Verbose() && os.Getenv("P2P_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func genKey(tb testing.TB) crypto.PrivKey {
	tb.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

// reserve listens on 127.0.0.1 .. 127.0.0.n with one shared port: the
// registry port every agent uses.
func reserve(tb testing.TB, n int) (uint16, []net.Listener) {
	tb.Helper()
	for range 20 {
		first, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		port := uint16(first.Addr().(*net.TCPAddr).Port)
		lns := []net.Listener{first}
		for i := 2; i <= n; i++ {
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:%d", i, port))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		if len(lns) == n {
			return port, lns
		}
		for _, ln := range lns {
			_ = ln.Close()
		}
	}
	tb.Fatal("could not reserve a common port on loopback addresses")
	return 0, nil
}

type node struct {
	*P2P
	ip  netip.Addr
	reg netip.AddrPort // registry address other nodes should get from Lookup
}

// startNode starts a router on the listener's IP and serves its IDHandler on
// the listener, as the registry would.
func startNode(tb testing.TB, ln net.Listener, port uint16, boot Bootstrapper, opts ...Option) *node {
	tb.Helper()
	ip := netip.MustParseAddrPort(ln.Addr().String()).Addr()
	all := []Option{
		WithLogger(testLogger().With("node", ip.String())),
		withBootstrapTiming(50*time.Millisecond, time.Second, 5*time.Second),
	}
	if boot != nil {
		all = append(all, WithBootstrapper(boot))
	}
	p, err := NewP2P(context.Background(), netip.AddrPortFrom(ip, 0).String(), port, IdentityKey(genKey(tb)), append(all, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(IDPath, p.IDHandler())
	srv := httptest.NewUnstartedServer(mux)
	_ = srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	tb.Cleanup(func() {
		srv.Close()
		if err := p.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return &node{P2P: p, ip: ip, reg: netip.AddrPortFrom(ip, port)}
}

func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitJoined(tb testing.TB, nodes ...*node) {
	tb.Helper()
	for _, n := range nodes {
		waitFor(tb, 15*time.Second, "node "+n.ip.String()+" to join", func() bool {
			ok, err := n.Ready(context.Background())
			return err == nil && ok && n.dht.RoutingTable().Size() > 0
		})
	}
}

func lookup(tb testing.TB, r Router, key string, count int, timeout time.Duration) ([]netip.AddrPort, time.Duration) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	ch, err := r.Lookup(ctx, key, count)
	if err != nil {
		tb.Fatal(err)
	}
	var out []netip.AddrPort
	for a := range ch {
		out = append(out, a)
	}
	return out, time.Since(start)
}

// waitFound retries lookups until key resolves to want.
func waitFound(tb testing.TB, r Router, key string, want netip.AddrPort) {
	tb.Helper()
	var got []netip.AddrPort
	var took time.Duration
	waitFor(tb, 15*time.Second, "lookup of "+key, func() bool {
		got, took = lookup(tb, r, key, 3, 2*time.Second)
		return slices.Contains(got, want)
	})
	if len(got) != 1 {
		tb.Errorf("lookup %s = %v, want only %v", key, got, want)
	}
	tb.Logf("lookup %s -> %v in %s", key, got, took)
}

func TestMissingRequired(t *testing.T) {
	_, err := NewP2P(context.Background(), "", 0, Identity{})
	if err == nil {
		t.Fatal("want error")
	}
	for _, name := range []string{"listen address", "registry port", "identity (KeyIn or Key)"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not name %s", err, name)
		}
	}
	_, err = NewP2P(context.Background(), "127.0.0.1:0", 0, IdentityKey(genKey(t)))
	if err == nil || !strings.Contains(err.Error(), "registry port") || strings.Contains(err.Error(), "listen address") {
		t.Fatalf("got %v, want only the registry port missing", err)
	}
	if _, err := NewP2P(context.Background(), "localhost:0", 1, IdentityKey(genKey(t))); err == nil {
		t.Fatal("want error for a hostname listen address")
	}
}

func TestKeyCID(t *testing.T) {
	for _, key := range []string{
		"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
		"docker.io/library/nginx:1.27",
		"10.1.2.3:5000/team/app:v1",
	} {
		c := keyCID(key)
		if c.Version() != 1 || c.Type() != cid.Raw {
			t.Errorf("%s: got %v", key, c)
		}
		dec, err := multihash.Decode(c.Hash())
		if err != nil || dec.Code != multihash.SHA2_256 {
			t.Errorf("%s: multihash %v %v", key, dec, err)
		}
		want, _ := multihash.Sum([]byte(key), multihash.SHA2_256, -1)
		if string(c.Hash()) != string(want) || !keyCID(key).Equals(c) {
			t.Errorf("%s: not sha2-256 of the key", key)
		}
	}
}

func TestLoneNode(t *testing.T) {
	port, lns := reserve(t, 2)
	// No bootstrapper at all.
	a := startNode(t, lns[0], port, nil)
	if ok, err := a.Ready(context.Background()); !ok || err != nil {
		t.Fatalf("Ready = %v, %v; want true", ok, err)
	}
	start := time.Now()
	if err := a.Advertise(context.Background(), []string{"sha256:aa", "docker.io/library/nginx:1.27"}); err != nil {
		t.Fatalf("advertise alone: %v", err)
	}
	t.Logf("advertise alone took %s", time.Since(start))
	got, took := lookup(t, a, "sha256:aa", 1, 2*time.Second)
	if len(got) != 0 {
		t.Fatalf("lookup returned self: %v", got)
	}
	t.Logf("lone lookup took %s", took)

	// A bootstrapper that only finds this node itself: ready once settled.
	b := startNode(t, lns[1], port, StaticBootstrapper{Entries: []string{lns[1].Addr().String()}})
	waitFor(t, 5*time.Second, "lone node with itself as bootstrap peer to be ready", func() bool {
		ok, _ := b.Ready(context.Background())
		return ok
	})
}

// A node whose bootstrap peers are all down serves alone rather than
// staying unready: agents that restart together must not wait on each other.
func TestReadyAloneWhenBootstrapPeersAreDown(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	_ = dead.Close() // connection refused from now on

	port, lns := reserve(t, 1)
	n := startNode(t, lns[0], port, StaticBootstrapper{Entries: []string{deadAddr}})
	waitFor(t, 5*time.Second, "ready alone", func() bool { ok, _ := n.Ready(context.Background()); return ok })
	if peers := n.Peers(); len(peers) != 0 {
		t.Fatalf("peers %v, want none", peers)
	}
}

func TestClusterAdvertiseLookup(t *testing.T) {
	const digest = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
	const tag = "docker.io/library/nginx:1.27"
	const late = "10.1.2.3:5000/team/app:v1"

	port, lns := reserve(t, 4)
	boot := StaticBootstrapper{Entries: []string{lns[0].Addr().String()}}
	a := startNode(t, lns[0], port, boot)
	waitFor(t, 5*time.Second, "first node ready", func() bool { ok, _ := a.Ready(context.Background()); return ok })

	// Advertised before any other node exists.
	if err := a.Advertise(context.Background(), []string{digest, tag}); err != nil {
		t.Fatal(err)
	}

	b := startNode(t, lns[1], port, boot)
	c := startNode(t, lns[2], port, boot)
	d := startNode(t, lns[3], port, boot)
	waitJoined(t, a, b, c, d)

	if err := a.Advertise(context.Background(), []string{late}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*node{b, c, d} {
		for _, key := range []string{digest, tag, late} {
			waitFound(t, n, key, a.reg)
		}
	}

	// A lookup from the provider itself skips it.
	if got, _ := lookup(t, a, digest, 3, time.Second); len(got) != 0 {
		t.Errorf("self lookup = %v, want none", got)
	}

	// Two providers: both are returned, count limits.
	if err := c.Advertise(context.Background(), []string{digest}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "two providers", func() bool {
		got, _ := lookup(t, b, digest, 5, 2*time.Second)
		return slices.Contains(got, a.reg) && slices.Contains(got, c.reg) && len(got) == 2
	})
	if got, _ := lookup(t, b, digest, 1, 2*time.Second); len(got) != 1 {
		t.Errorf("count 1 gave %v", got)
	}

	// Unknown key: the lookup ends on its own, quickly.
	got, took := lookup(t, b, "sha256:0000000000000000000000000000000000000000000000000000000000000000", 1, 5*time.Second)
	t.Logf("unknown key lookup ended in %s", took)
	if len(got) != 0 {
		t.Errorf("unknown key found at %v", got)
	}
	if took > 2*time.Second {
		t.Errorf("unknown key lookup took %s", took)
	}

	// The 20ms budget the mirror gives a lookup of a known key.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	ch, err := d.Lookup(ctx, tag, 1)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	first, ok := <-ch
	t.Logf("20ms-bounded lookup: %v %v after %s", first, ok, time.Since(start))
	cancel()
	for range ch {
	}

	peers := a.Peers()
	if len(peers) != 3 {
		t.Errorf("Peers() = %v, want 3", peers)
	}
	for _, p := range peers {
		ap, err := netip.ParseAddrPort(p.Address)
		if err != nil || ap.Port() != port || !slices.Contains([]netip.Addr{b.ip, c.ip, d.ip}, ap.Addr()) {
			t.Errorf("peer %+v: unexpected address", p)
		}
	}
}

func TestWithdraw(t *testing.T) {
	const gone = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	const kept = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	port, lns := reserve(t, 3)
	boot := StaticBootstrapper{Entries: []string{lns[0].Addr().String()}}
	// A short validity so remote records of the withdrawn key expire in-test.
	validity := WithProvideValidity(3 * time.Second)
	a := startNode(t, lns[0], port, boot, validity)
	b := startNode(t, lns[1], port, boot, validity)
	c := startNode(t, lns[2], port, boot, validity)
	waitJoined(t, a, b, c)

	if err := a.Advertise(context.Background(), []string{gone, kept}); err != nil {
		t.Fatal(err)
	}
	waitFound(t, b, gone, a.reg)
	waitFound(t, c, kept, a.reg)

	if err := a.Withdraw(context.Background(), []string{gone}); err != nil {
		t.Fatal(err)
	}
	provs, err := a.dht.ProviderStore().GetProviders(context.Background(), keyCID(gone).Hash())
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(provs, func(ai peer.AddrInfo) bool { return ai.ID == a.ID() }) {
		t.Error("withdrawn key still lists this node in its own provider store")
	}
	if slices.ContainsFunc(a.snapshot(), keyCID(gone).Equals) {
		t.Error("withdrawn key still in the re-provide set")
	}

	// Records on b and c expire; kept is re-provided and stays.
	start := time.Now()
	waitFor(t, 15*time.Second, "withdrawn key to disappear", func() bool {
		got, _ := lookup(t, b, gone, 1, time.Second)
		return len(got) == 0
	})
	t.Logf("withdrawn key gone from lookups after %s", time.Since(start))
	time.Sleep(4 * time.Second) // longer than the validity: only re-provided records survive
	if got, _ := lookup(t, c, kept, 1, 2*time.Second); !slices.Contains(got, a.reg) {
		t.Errorf("kept key lookup = %v, want %v", got, a.reg)
	}
	if got, _ := lookup(t, c, gone, 1, time.Second); len(got) != 0 {
		t.Errorf("withdrawn key still found at %v", got)
	}
}

func TestIdentityPersisted(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	start := func() peer.ID {
		p, err := NewP2P(context.Background(), "127.0.0.1:0", 5000, IdentityKeyIn(dir))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = p.Close() }()
		return p.ID()
	}
	first := start()
	st, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
	if second := start(); second != first {
		t.Fatalf("peer ID changed across restart: %s -> %s", first, second)
	}

	if err := os.WriteFile(filepath.Join(dir, KeyFile), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewP2P(context.Background(), "127.0.0.1:0", 5000, IdentityKeyIn(dir)); err == nil {
		t.Fatal("want error for a corrupt key file")
	}
}

func TestCloseOnContextCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	p, err := NewP2P(ctx, "127.0.0.1:0", 5000, IdentityKey(genKey(t)),
		WithBootstrapper(StaticBootstrapper{Entries: []string{"127.0.0.1:1"}}))
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	waitFor(t, 5*time.Second, "close after cancel", func() bool {
		_, err := p.Ready(context.Background())
		return errors.Is(err, ErrClosed)
	})
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Lookup(context.Background(), "k", 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("lookup after close: %v", err)
	}
}

func TestIPv6Listen(t *testing.T) {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skip("no IPv6 loopback:", err)
	}
	_ = ln.Close()
	p, err := NewP2P(context.Background(), "[::1]:0", 5000, IdentityKey(genKey(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = p.Close() }()
	if len(p.Addrs()) == 0 || !strings.HasPrefix(p.Addrs()[0].String(), "/ip6/::1/tcp/") {
		t.Fatalf("addrs %v", p.Addrs())
	}
}

func TestIDHandler(t *testing.T) {
	port, lns := reserve(t, 1)
	n := startNode(t, lns[0], port, nil)
	url := "http://" + lns[0].Addr().String() + IDPath
	res, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = res.Body.Close() }()
	var body IDResponse
	if err := json.NewDecoder(res.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	if body.ID != n.ID().String() || len(body.Addrs) == 0 || res.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("got %+v", body)
	}
	ai, err := FetchID(context.Background(), nil, lns[0].Addr().String())
	if err != nil || ai.ID != n.ID() || len(ai.Addrs) == 0 {
		t.Fatalf("FetchID = %v, %v", ai, err)
	}
	res2, err := http.Post(url, "text/plain", strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, res2.Body)
	_ = res2.Body.Close()
	if res2.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST status %d", res2.StatusCode)
	}
}

func TestStaticBootstrapperEntries(t *testing.T) {
	port, lns := reserve(t, 2)
	a := startNode(t, lns[0], port, nil)
	b := startNode(t, lns[1], port, nil)
	full := b.Addrs()[0].String() + "/p2p/" + b.ID().String()
	infos, err := StaticBootstrapper{Entries: []string{lns[0].Addr().String(), full, " "}}.Peers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ids := []peer.ID{}
	for _, ai := range infos {
		ids = append(ids, ai.ID)
	}
	if len(ids) != 2 || !slices.Contains(ids, a.ID()) || !slices.Contains(ids, b.ID()) {
		t.Fatalf("got %v", infos)
	}
	if _, err := (StaticBootstrapper{Entries: []string{"/ip4/127.0.0.1/tcp/1"}}).Peers(context.Background()); err == nil {
		t.Fatal("want error for a multiaddr without /p2p")
	}
}

func TestDNSBootstrapper(t *testing.T) {
	port, lns := reserve(t, 3)
	a := startNode(t, lns[0], port, nil)
	b := startNode(t, lns[1], port, nil)
	const name = "fleetmirror.kube-system.svc.cluster.local"
	var calls atomic.Int32
	fake := ResolverFunc(func(_ context.Context, network, host string) ([]netip.Addr, error) {
		calls.Add(1)
		if host != name {
			return nil, fmt.Errorf("unexpected name %q", host)
		}
		// The mapped duplicate must fold into 127.0.0.1; nothing listens on
		// 127.0.0.4 (a dead agent); 127.0.0.3 is the joining node itself.
		return []netip.Addr{a.ip, netip.MustParseAddr("::ffff:127.0.0.1"), b.ip, netip.MustParseAddr("127.0.0.4")}, nil
	})
	boot := DNSBootstrapper{Name: name, Port: port, Resolver: fake}

	infos, err := boot.Peers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 {
		t.Fatalf("got %v, want a and b", infos)
	}

	skip := boot
	skip.Skip = []netip.Addr{a.ip}
	infos, err = skip.Peers(context.Background())
	if err != nil || len(infos) != 1 || infos[0].ID != b.ID() {
		t.Fatalf("with skip: %v, %v", infos, err)
	}

	limited := boot
	limited.Max = 1 // one plus one spare
	if infos, err = limited.Peers(context.Background()); err != nil || len(infos) == 0 || len(infos) > 2 {
		t.Fatalf("limited: %v, %v", infos, err)
	}

	failing := DNSBootstrapper{Name: name, Port: port, Resolver: ResolverFunc(func(context.Context, string, string) ([]netip.Addr, error) {
		return nil, errors.New("no such host")
	})}
	if _, err := failing.Peers(context.Background()); err == nil {
		t.Fatal("want resolver error")
	}

	// A node joining through DNS; the name also resolves to itself.
	self := ResolverFunc(func(ctx context.Context, network, host string) ([]netip.Addr, error) {
		return []netip.Addr{a.ip, b.ip, netip.MustParseAddr("127.0.0.3")}, nil
	})
	c := startNode(t, lns[2], port, DNSBootstrapper{Name: name, Port: port, Resolver: ResolverFunc(func(ctx context.Context, network, host string) ([]netip.Addr, error) {
		calls.Add(1)
		return self(ctx, network, host)
	})})
	waitJoined(t, c)
	if err := a.Advertise(context.Background(), []string{"docker.io/library/alpine:3"}); err != nil {
		t.Fatal(err)
	}
	waitFound(t, c, "docker.io/library/alpine:3", a.reg)
	if calls.Load() == 0 {
		t.Fatal("fake resolver never called")
	}
}

func TestDialableAddrs(t *testing.T) {
	ai, err := peer.AddrInfoFromString("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf")
	if err != nil {
		t.Fatal(err)
	}
	loop, _ := peer.AddrInfoFromString("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf")
	other, _ := peer.AddrInfoFromString("/ip4/172.17.0.1/tcp/4001/p2p/12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf")
	all := append(append(slices.Clone(loop.Addrs), other.Addrs...), ai.Addrs...)
	if got := dialableAddrs(all, netip.MustParseAddr("10.0.0.2")); len(got) != 1 || !got[0].Equal(ai.Addrs[0]) {
		t.Errorf("same-IP preference: %v", got)
	}
	if got := dialableAddrs(all, netip.MustParseAddr("10.0.0.9")); len(got) != 2 || slices.ContainsFunc(got, loop.Addrs[0].Equal) {
		t.Errorf("loopback must be dropped for a remote target: %v", got)
	}
}

// BenchmarkLookup measures the lookup of an advertised key from random
// non-provider nodes of an in-process cluster. Setup is outside the timer.
func BenchmarkLookup(b *testing.B) {
	for _, n := range []int{10, 50, 100} {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			const key = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
			const port = 5000
			setup := time.Now()
			nodes := make([]*P2P, n)
			for i := range nodes {
				opts := []Option{
					withBootstrapTiming(50*time.Millisecond, time.Second, 30*time.Second),
				}
				if i > 0 {
					// Join through the first node directly, no HTTP needed.
					first := nodes[0].Addrs()[0].String() + "/p2p/" + nodes[0].ID().String()
					opts = append(opts, WithBootstrapper(StaticBootstrapper{Entries: []string{first}}))
				}
				p, err := NewP2P(context.Background(), "127.0.0.1:0", port, IdentityKey(genKey(b)), opts...)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = p.Close() })
				nodes[i] = p
			}
			for _, p := range nodes[1:] {
				waitFor(b, 60*time.Second, "join", func() bool { return p.dht.RoutingTable().Size() > 0 })
			}
			if err := nodes[0].Advertise(context.Background(), []string{key}); err != nil {
				b.Fatal(err)
			}
			want := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
			for _, p := range nodes[1:] {
				waitFor(b, 60*time.Second, "key visible", func() bool {
					got, _ := lookup(b, p, key, 1, 2*time.Second)
					return slices.Contains(got, want)
				})
			}
			b.Logf("setup of %d peers took %s", n, time.Since(setup))

			misses := 0
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				got, _ := lookup(b, nodes[1+i%(n-1)], key, 1, 2*time.Second)
				if len(got) == 0 {
					misses++
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(misses)/float64(b.N), "misses/op")
		})
	}
}

// fixedBootstrapper names one peer, whatever answers at its address.
type fixedBootstrapper struct{ peer.AddrInfo }

func (b fixedBootstrapper) Peers(context.Context) ([]peer.AddrInfo, error) {
	return []peer.AddrInfo{b.AddrInfo}, nil
}

// A bootstrap peer that was unreachable at first is joined as soon as it
// listens: libp2p's dial backoff (5s and more after a failed dial) must not
// keep a node alone for rounds after the peer came up.
func TestBootstrapIgnoresDialBackoff(t *testing.T) {
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(gone.Addr().String())
	_ = gone.Close() // refused until the peer starts there

	key := genKey(t)
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	target := peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{ma.StringCast(fmt.Sprintf("/ip4/%s/tcp/%d", addr.Addr(), addr.Port()))}}

	port, lns := reserve(t, 1)
	n := startNode(t, lns[0], port, fixedBootstrapper{target})
	// Ready alone means a bootstrap round failed: the swarm now backs off
	// from the target.
	waitFor(t, 5*time.Second, "a failed bootstrap round", func() bool { ok, _ := n.Ready(context.Background()); return ok })

	late, err := NewP2P(context.Background(), addr.String(), port, IdentityKey(key), WithLogger(testLogger()))
	if err != nil {
		t.Fatalf("starting the late peer on %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = late.Close() })
	started := time.Now()
	// Bootstrap rounds come at most 1s apart here; the swarm's backoff
	// alone would hold the dial back for 5s.
	waitFor(t, 3*time.Second, "joining the late peer", func() bool {
		return n.host.Network().Connectedness(id) == network.Connected
	})
	t.Logf("joined the late peer %v after it started", time.Since(started).Round(time.Millisecond))
}
