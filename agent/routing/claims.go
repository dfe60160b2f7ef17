package routing

import (
	"context"
	"errors"
	"net/netip"
	"strconv"
	"sync"
	"time"

	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Claims are short-lived announcements about a key: that a node wants it
// (it missed the blob) or that it fetches it upstream, so that nodes
// missing the same blob at once can agree on one fetcher (see agent/claim).
type Claims interface {
	// Self is this node's identity among claimants.
	Self() string
	// Claim announces this node's claim of the kind on key.
	Claim(ctx context.Context, kind ClaimKind, key string) error
	// Claimants lists the other nodes that made a claim of the kind on key
	// lately, as found until ctx is done.
	Claimants(ctx context.Context, kind ClaimKind, key string) ([]Claimant, error)
}

// ClaimKind is what a claim says.
type ClaimKind string

const (
	// Want: this node missed the key and would fetch it.
	Want ClaimKind = "want"
	// Fetch: this node fetches the key upstream now.
	Fetch ClaimKind = "fetch"
)

// Claimant is a node that claimed a key.
type Claimant struct {
	ID   string
	Addr netip.AddrPort // its registry
}

// ClaimEpoch is how long a claim counts. Claims are provider records under
// a key that names the epoch, and lookups read the current and the
// previous epoch only, so a claim is seen for one to two epochs: a DHT
// record cannot be revoked, and an old claim of a node that has long
// finished (or died) must not win a later burst.
const ClaimEpoch = 30 * time.Second

func claimKeys(kind ClaimKind, key string, now time.Time) (current, previous string) {
	e := now.Unix() / int64(ClaimEpoch/time.Second)
	return claimKey(kind, key, e), claimKey(kind, key, e-1)
}

func claimKey(kind ClaimKind, key string, epoch int64) string {
	return "fleetmirror-" + string(kind) + "/" + strconv.FormatInt(epoch, 10) + "/" + key
}

var _ Claims = (*P2P)(nil)

// Self implements Claims.
func (p *P2P) Self() string { return p.host.ID().String() }

// Claim implements Claims. A claim must land within a settle window, so
// it skips the network lookup a DHT provide makes: the record goes
// straight to the peers of the routing table closest to the key (in a
// cluster's DHT, where each agent knows the others, the same peers a
// lookup would find) and to this node's own provider store. It is not
// re-provided.
func (p *P2P) Claim(ctx context.Context, kind ClaimKind, key string) error {
	cur, _ := claimKeys(kind, key, time.Now())
	mh := keyCID(cur).Hash()
	self := peer.AddrInfo{ID: p.host.ID(), Addrs: p.dht.FilteredAddrs()}
	if err := p.dht.ProviderStore().AddProvider(ctx, mh, self); err != nil {
		return err
	}
	nearest := p.dht.RoutingTable().NearestPeers(kb.ConvertKey(string(mh)), p.dht.BucketSize())
	errs := make([]error, len(nearest))
	var wg sync.WaitGroup
	for i, id := range nearest {
		wg.Go(func() { errs[i] = p.msgr.PutProviderAddrs(ctx, id, mh, self) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Claimants implements Claims. It asks the peers a claim goes to (see
// Claim), all at once, for the current and the previous epoch, and reads
// this node's own provider store: one round trip, where a DHT lookup takes
// several, each slow on a node busy pulling. The answers that came before
// ctx is done are the list, with ErrNoAnswer if there were none.
func (p *P2P) Claimants(ctx context.Context, kind ClaimKind, key string) ([]Claimant, error) {
	if !p.track() {
		return nil, ErrClosed
	}
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(p.ctx, cancel)
	defer stop()
	cur, prev := claimKeys(kind, key, time.Now())
	var (
		mu              sync.Mutex
		found           []peer.AddrInfo
		wg              sync.WaitGroup
		asked, answered int
	)
	for _, k := range []string{cur, prev} {
		mh := keyCID(k).Hash()
		local, _ := p.dht.ProviderStore().GetProviders(ctx, mh)
		mu.Lock()
		found = append(found, local...)
		mu.Unlock()
		for _, id := range p.dht.RoutingTable().NearestPeers(kb.ConvertKey(string(mh)), p.dht.BucketSize()) {
			asked++
			wg.Go(func() {
				provs, _, err := p.msgr.GetProviders(ctx, id, mh)
				if err != nil {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				answered++
				for _, ai := range provs {
					found = append(found, *ai)
				}
			})
		}
	}
	wg.Wait()
	seen := map[peer.ID]bool{p.host.ID(): true}
	var out []Claimant
	for _, ai := range found {
		if seen[ai.ID] {
			continue
		}
		seen[ai.ID] = true
		if ip, ok := p.peerIP(ai); ok {
			out = append(out, Claimant{ID: ai.ID.String(), Addr: netip.AddrPortFrom(ip, p.cfg.registryPort)})
		}
	}
	if asked > 0 && answered == 0 {
		return out, ErrNoAnswer
	}
	return out, nil
}

// ErrNoAnswer: no peer answered in time, so the claimants listed are only
// those this node holds itself. On a node starved of CPU (20 nodes on 2
// cores) lists came back empty in a burst, and the node took itself for
// the only one that missed the blob.
var ErrNoAnswer = errors.New("no peer answered")

var _ Claims = (*Memory)(nil)

// Self implements Claims.
func (m *Memory) Self() string { return m.self.String() }

// Claim implements Claims.
func (m *Memory) Claim(ctx context.Context, kind ClaimKind, key string) error {
	cur, _ := claimKeys(kind, key, time.Now())
	return m.Advertise(ctx, []string{cur})
}

// Claimants implements Claims.
func (m *Memory) Claimants(ctx context.Context, kind ClaimKind, key string) ([]Claimant, error) {
	cur, prev := claimKeys(kind, key, time.Now())
	var out []Claimant
	seen := map[netip.AddrPort]bool{}
	for _, k := range []string{cur, prev} {
		ch, _ := m.Lookup(ctx, k, 1000)
		for a := range ch {
			if !seen[a] {
				seen[a] = true
				out = append(out, Claimant{ID: a.String(), Addr: a})
			}
		}
	}
	return out, nil
}
