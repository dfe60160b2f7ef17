package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// UpstreamPort is where the upstream registry listens on its namespace's IP.
const UpstreamPort = 5000

// AltPort is where the same registry is also reachable on every node's own
// loopback; see AltHost.
const AltPort = 5001

// Upstream is a real OCI registry (go-containerregistry's in-memory one)
// served by this process but listening inside its own network namespace, so
// it is a separate "host" on the test subnet and every request can be
// attributed to the node that made it.
type Upstream struct {
	NS string
	IP netip.Addr

	handler http.Handler
	logf    func(string, ...any)
	latency time.Duration
	limiter *rate.Limiter

	mu      sync.Mutex
	srv     *http.Server
	alts    []altClient
	stats   UpstreamStats
	sending map[netip.Addr]*atomic.Int64
	sizes   map[string]int64 // layer digest -> size, of the images pushed
}

// Sending is how many bytes responses still in progress have sent to ip so
// far: who is fetching from upstream right now (Stats counts a request
// once it is done).
func (u *Upstream) Sending(ip netip.Addr) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	if c := u.sending[ip]; c != nil {
		return c.Load()
	}
	return 0
}

// altClient is a node namespace where the upstream also listens on
// 127.0.0.1:AltPort; requests there are counted as the node's.
type altClient struct {
	ns  string
	ip  netip.Addr
	srv *http.Server
}

// Counter counts requests and response body bytes.
type Counter struct {
	Requests int64
	Bytes    int64
}

// UpstreamStats is what the upstream served since start or the last Reset.
// Keys of ByKind are "<METHOD> <kind>", kind one of manifest, blob, upload,
// other: "GET blob", "HEAD manifest".
type UpstreamStats struct {
	ByKind   map[string]Counter
	ByClient map[netip.Addr]map[string]Counter
	// BlobGets counts GET requests per blob digest ("sha256:...").
	BlobGets map[string]int64
	// Repositories counts requests per repository named in the path
	// (/v2/<repository>/manifests|blobs/...), with the ?ns= a mirror
	// request would carry appended as " ns=<registry>": what was asked
	// for, by name.
	Repositories map[string]int64
}

// Get returns the counter for method and kind over all clients.
func (s UpstreamStats) Get(method, kind string) Counter { return s.ByKind[method+" "+kind] }

// FromClient returns the counter for method and kind of one client IP.
func (s UpstreamStats) FromClient(ip netip.Addr, method, kind string) Counter {
	return s.ByClient[ip][method+" "+kind]
}

// BlobBytes is the number of blob body bytes served to anyone.
func (s UpstreamStats) BlobBytes() int64 { return s.Get("GET", "blob").Bytes }

func newStats() UpstreamStats {
	return UpstreamStats{ByKind: map[string]Counter{}, ByClient: map[netip.Addr]map[string]Counter{}, BlobGets: map[string]int64{}, Repositories: map[string]int64{}}
}

func newUpstream(ns string, ip netip.Addr, opts Options) *Upstream {
	u := &Upstream{
		NS:      ns,
		IP:      ip,
		logf:    opts.Logf,
		latency: opts.UpstreamLatency,
		stats:   newStats(),
	}
	u.handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	u.limiter = newLimiter(opts.UpstreamRate)
	return u
}

// newLimiter is one token bucket for all connections, since a registry's
// uplink is shared; nil when unshaped.
func newLimiter(bytesPerSec int64) *rate.Limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	burst := int(min(max(bytesPerSec/20, 16<<10), 1<<20))
	return rate.NewLimiter(rate.Limit(bytesPerSec), burst)
}

// SetShaping changes the upstream's bandwidth (bytes/s, 0 = unshaped) and
// added latency for requests that start from now on.
func (u *Upstream) SetShaping(bytesPerSec int64, latency time.Duration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.limiter, u.latency = newLimiter(bytesPerSec), latency
}

// Host is "IP:5000", the registry host in image references.
func (u *Upstream) Host() string { return netip.AddrPortFrom(u.IP, UpstreamPort).String() }

// URL is "http://IP:5000".
func (u *Upstream) URL() string { return "http://" + u.Host() }

// Ref returns Host()+"/"+repoAndTag.
func (u *Upstream) Ref(repoAndTag string) string { return u.Host() + "/" + repoAndTag }

// Start (re)starts serving; the stored images survive Stop/Start.
func (u *Upstream) Start() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.srv != nil {
		return nil
	}
	ln, err := listenInNetns(nsPath(u.NS), "tcp", u.Host())
	if err != nil {
		return fmt.Errorf("upstream: listen in %s: %w", u.NS, err)
	}
	u.srv = u.serveOn(ln, u.serve)
	for i := range u.alts {
		if err := u.startAlt(&u.alts[i]); err != nil {
			return err
		}
	}
	return nil
}

func (u *Upstream) serveOn(ln net.Listener, h http.HandlerFunc) *http.Server {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			u.logf("upstream: serve: %v", err)
		}
	}()
	return srv
}

// AltHost is "127.0.0.1:5001": the same registry and content as Host, as a
// second registry name that is not in the default mirrored list. It listens
// on each node's own loopback (containerd talks plain HTTP to loopback
// registries without any hosts.toml) and counts requests as the node's IP.
// Only reachable from inside node namespaces.
func (u *Upstream) AltHost() string {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), AltPort).String()
}

// addAltClient makes the registry reachable at AltHost inside ns.
func (u *Upstream) addAltClient(ns string, ip netip.Addr) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.alts = append(u.alts, altClient{ns: ns, ip: ip})
	if u.srv == nil {
		return nil
	}
	return u.startAlt(&u.alts[len(u.alts)-1])
}

func (u *Upstream) startAlt(a *altClient) error {
	ln, err := listenInNetns(nsPath(a.ns), "tcp", u.AltHost())
	if err != nil {
		return fmt.Errorf("upstream: listen on %s in %s: %w", u.AltHost(), a.ns, err)
	}
	client := a.ip
	a.srv = u.serveOn(ln, func(w http.ResponseWriter, r *http.Request) {
		r.RemoteAddr = netip.AddrPortFrom(client, 0).String()
		u.serve(w, r)
	})
	return nil
}

// Stop closes the listeners (Host and AltHost) and every open connection, so
// pulls in flight fail and new ones get connection refused.
func (u *Upstream) Stop() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.srv == nil {
		return nil
	}
	errs := []error{u.srv.Close()}
	u.srv = nil
	for i := range u.alts {
		if a := &u.alts[i]; a.srv != nil {
			errs = append(errs, a.srv.Close())
			a.srv = nil
		}
	}
	return errors.Join(errs...)
}

// Stats returns a copy of the counters.
func (u *Upstream) Stats() UpstreamStats {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := newStats()
	for k, v := range u.stats.ByKind {
		s.ByKind[k] = v
	}
	for ip, m := range u.stats.ByClient {
		c := map[string]Counter{}
		for k, v := range m {
			c[k] = v
		}
		s.ByClient[ip] = c
	}
	for k, v := range u.stats.BlobGets {
		s.BlobGets[k] = v
	}
	for k, v := range u.stats.Repositories {
		s.Repositories[k] = v
	}
	return s
}

// Reset zeroes the counters.
func (u *Upstream) Reset() {
	u.mu.Lock()
	u.stats = newStats()
	u.mu.Unlock()
}

// Push uploads img under ref ("IP:5000/repo:tag" or "repo:tag") over plain HTTP.
func (u *Upstream) Push(ctx context.Context, ref string, img v1.Image) error {
	if !strings.HasPrefix(ref, u.Host()+"/") {
		ref = u.Ref(ref)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("push: %w", err)
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.sizes == nil {
		u.sizes = map[string]int64{}
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return err
		}
		if u.sizes[d.String()], err = l.Size(); err != nil {
			return err
		}
	}
	return nil
}

// closeRange turns an open-ended blob Range ("bytes=N-"), which containerd
// sends to resume a blob and real registries serve, into the closed form
// go-containerregistry's registry parses.
func (u *Upstream) closeRange(r *http.Request, kind, ref string) {
	rng := r.Header.Get("Range")
	if kind != "blob" || !strings.HasPrefix(rng, "bytes=") || !strings.HasSuffix(rng, "-") {
		return
	}
	u.mu.Lock()
	size, ok := u.sizes[ref]
	u.mu.Unlock()
	if ok {
		r.Header.Set("Range", fmt.Sprintf("%s%d", rng, size-1))
	}
}

// requestKind classifies /v2/<name>/{manifests,blobs}/<ref> paths.
func requestKind(path string) (kind, ref string) {
	if !strings.HasPrefix(path, "/v2/") {
		return "other", ""
	}
	if strings.Contains(path, "/blobs/uploads") {
		return "upload", ""
	}
	// Repository names may contain "manifests" or "blobs": the last one wins.
	m, b := strings.LastIndex(path, "/manifests/"), strings.LastIndex(path, "/blobs/")
	switch {
	case m >= 0 && m > b:
		return "manifest", path[m+len("/manifests/"):]
	case b >= 0:
		return "blob", path[b+len("/blobs/"):]
	}
	return "other", ""
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	latency, limiter := u.latency, u.limiter
	u.mu.Unlock()
	if latency > 0 {
		select {
		case <-time.After(latency):
		case <-r.Context().Done():
			return
		}
	}
	kind, ref := requestKind(r.URL.Path)
	u.closeRange(r, kind, ref)
	client := netip.Addr{}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		client = ap.Addr().Unmap()
	}
	u.mu.Lock()
	if u.sending == nil {
		u.sending = map[netip.Addr]*atomic.Int64{}
	}
	live := u.sending[client]
	if live == nil {
		live = &atomic.Int64{}
		u.sending[client] = live
	}
	u.mu.Unlock()
	cw := &countingWriter{ResponseWriter: w, limiter: limiter, ctx: r.Context(), live: live}
	u.handler.ServeHTTP(cw, r)
	live.Add(-cw.n)

	key := r.Method + " " + kind
	u.mu.Lock()
	defer u.mu.Unlock()
	add := func(m map[string]Counter) {
		c := m[key]
		c.Requests++
		c.Bytes += cw.n
		m[key] = c
	}
	add(u.stats.ByKind)
	if u.stats.ByClient[client] == nil {
		u.stats.ByClient[client] = map[string]Counter{}
	}
	add(u.stats.ByClient[client])
	if kind == "blob" && r.Method == http.MethodGet {
		u.stats.BlobGets[ref]++
	}
	if repo := requestRepository(r.URL.Path); repo != "" || r.URL.Query().Has("ns") {
		if ns := r.URL.Query().Get("ns"); ns != "" {
			repo += " ns=" + ns
		}
		u.stats.Repositories[repo]++
	}
}

// requestRepository is the repository of a /v2/<name>/{manifests,blobs}/
// path, "" for any other path.
func requestRepository(path string) string {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return ""
	}
	m, b := strings.LastIndex(rest, "/manifests/"), strings.LastIndex(rest, "/blobs/")
	if i := max(m, b); i > 0 {
		return rest[:i]
	}
	return ""
}

// countingWriter counts body bytes and, when shaping, takes them from the
// shared token bucket in chunks no larger than its burst.
type countingWriter struct {
	http.ResponseWriter
	limiter *rate.Limiter
	ctx     context.Context
	n       int64
	live    *atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.limiter == nil {
		n, err := c.ResponseWriter.Write(p)
		c.n += int64(n)
		c.live.Add(int64(n))
		return n, err
	}
	written := 0
	for len(p) > 0 {
		chunk := min(len(p), c.limiter.Burst())
		if err := c.limiter.WaitN(c.ctx, chunk); err != nil {
			return written, err
		}
		n, err := c.ResponseWriter.Write(p[:chunk])
		written += n
		c.n += int64(n)
		c.live.Add(int64(n))
		if err != nil {
			return written, err
		}
		p = p[chunk:]
	}
	return written, nil
}

func (c *countingWriter) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// listenInNetns creates a listening socket inside the network namespace at
// path. A socket stays in the namespace it was created in, so only creation
// needs the namespace.
func listenInNetns(path, network, addr string) (net.Listener, error) {
	return inNetns(path, func() (net.Listener, error) { return net.Listen(network, addr) })
}

// dialInNetns connects from inside the network namespace at path.
func dialInNetns(ctx context.Context, path, network, addr string) (net.Conn, error) {
	return inNetns(path, func() (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, network, addr) })
}

// inNetns runs f on a locked OS thread switched into the network
// namespace at path. The thread is never unlocked, so Go discards it
// afterwards instead of reusing it for unrelated goroutines.
func inNetns[T any](path string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// Deliberately no UnlockOSThread: the thread dies with this goroutine.
		var zero T
		nsf, err := os.Open(path)
		if err != nil {
			ch <- result{zero, err}
			return
		}
		defer nsf.Close()
		if err := unix.Setns(int(nsf.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{zero, fmt.Errorf("setns %s: %w", path, err)}
			return
		}
		v, err := f()
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}
