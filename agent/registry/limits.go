package registry

import (
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
)

// DefaultMaxRequests bounds the requests the registry serves at once, and
// DefaultMaxRequests/ClientShare those of one client IP. Both kinds of
// peer fetch hold a slot while they run: a blob this node serves a peer,
// and a stream it runs from peers on behalf of its own containerd.
//
// A real pull stays far below: containerd fetches about 3 layers of an
// image at once, and kubelet pulls one image at a time unless told
// otherwise, so even ten images pulled in parallel are ~30 requests from
// one client; in a first wave each follower streams its 3-4 layers from
// the node fetching them, so one node serves a burst of 100 followers in
// under 512. What the bound stops is a client holding thousands of
// connections, each a goroutine and a 32 KiB buffer (or a blob under
// 4 MiB being verified).
const DefaultMaxRequests = 512

// ClientShare: one client IP may hold a share of the total, so it takes
// that many clients to fill it. With the default that is 64 per client.
const ClientShare = 8

// retryAfter is what a refused client is told to wait: slots are held for
// the length of one transfer, seconds at most.
const retryAfter = 1

// limiter counts requests in progress, in total and per client IP.
type limiter struct {
	mu        sync.Mutex
	total     int
	perClient int
	n         int
	clients   map[netip.Addr]int
}

func newLimiter(total, perClient int) *limiter {
	return &limiter{total: total, perClient: perClient, clients: map[netip.Addr]int{}}
}

// acquire takes a slot for the client of req, or answers 429 (this
// client is at its share) or 503 (the agent is full) with a Retry-After
// and returns false. The caller calls release when done.
func (l *limiter) acquire(w http.ResponseWriter, req *http.Request) (release func(), ok bool) {
	ap, _ := netip.ParseAddrPort(req.RemoteAddr)
	ip := ap.Addr().Unmap()
	l.mu.Lock()
	switch {
	case l.clients[ip] >= l.perClient:
		l.mu.Unlock()
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
		writeError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", fmt.Sprintf(
			"%s already has %d requests in progress on this agent, the most one client may have (--max-requests/%d); retry after %ds",
			ip, l.perClient, ClientShare, retryAfter))
		return nil, false
	case l.n >= l.total:
		l.mu.Unlock()
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
		writeError(w, http.StatusServiceUnavailable, "UNAVAILABLE", fmt.Sprintf(
			"this agent is serving %d requests, its limit (--max-requests); retry after %ds or fetch from the next host",
			l.total, retryAfter))
		return nil, false
	}
	l.n++
	l.clients[ip]++
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.n--
		if l.clients[ip]--; l.clients[ip] == 0 {
			delete(l.clients, ip)
		}
	}, true
}
