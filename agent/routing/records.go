package routing

import (
	"context"
	"errors"
	"strings"
	"sync"

	ds "github.com/ipfs/go-datastore"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-base32"
)

// maxRecordsPerPeer bounds the provider records this node keeps for any
// one other peer. A node advertises every blob, manifest and tag it
// holds (about 10,000 keys for a node with a few hundred images), and in
// a small cluster every node stores all of every peer's records; five
// times that leaves room, while one misbehaving member cannot grow this
// node's memory without bound (a record costs about 200 bytes).
const maxRecordsPerPeer = 50_000

var errTooManyRecords = errors.New("routing: peer has too many provider records here")

// boundedStore is the provider manager's datastore, counting records per
// providing peer and refusing new ones over maxRecordsPerPeer. kad-dht
// has no provider-store hook, so the bound sits where its records are
// written: keys are /providers/<base32 key>/<base32 peer ID>.
type boundedStore struct {
	ds.Batching
	self  string // base32, as in keys: our own records are not bounded
	limit int

	mu    sync.Mutex
	count map[string]int // base32 peer ID -> records
}

func newBoundedStore(inner ds.Batching, self peer.ID, limit int) *boundedStore {
	return &boundedStore{Batching: inner, self: peerKey(self), limit: limit, count: map[string]int{}}
}

func peerKey(p peer.ID) string { return base32.RawStdEncoding.EncodeToString([]byte(p)) }

// providerKey is the datastore key of p's provider record for mh, as kad-dht's
// records.ProviderManager writes it (its mkProvKeyFor, unexported):
// /providers/<base32 multihash>/<base32 peer ID>. Withdraw deletes it and
// providerOf parses it; TestProviderManagerLayout fails if kad-dht changes it.
func providerKey(mh []byte, p peer.ID) ds.Key {
	return ds.NewKey(records.ProvidersKeyPrefix + base32.RawStdEncoding.EncodeToString(mh) + "/" + peerKey(p))
}

// providerOf returns the base32 peer ID part of a provider record key.
func providerOf(k ds.Key) (string, bool) {
	s := k.String()
	if !strings.HasPrefix(s, records.ProvidersKeyPrefix) {
		return "", false
	}
	i := strings.LastIndexByte(s, '/')
	if i < len(records.ProvidersKeyPrefix) {
		return "", false
	}
	return s[i+1:], true
}

func (b *boundedStore) Put(ctx context.Context, k ds.Key, v []byte) error {
	p, ok := providerOf(k)
	if !ok || p == b.self {
		return b.Batching.Put(ctx, k, v)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	has, err := b.Batching.Has(ctx, k)
	if err != nil {
		return err
	}
	if !has && b.count[p] >= b.limit {
		return errTooManyRecords
	}
	if err := b.Batching.Put(ctx, k, v); err != nil {
		return err
	}
	if !has {
		b.count[p]++
	}
	return nil
}

func (b *boundedStore) Delete(ctx context.Context, k ds.Key) error {
	p, ok := providerOf(k)
	if !ok || p == b.self {
		return b.Batching.Delete(ctx, k)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	has, err := b.Batching.Has(ctx, k)
	if err != nil {
		return err
	}
	if err := b.Batching.Delete(ctx, k); err != nil {
		return err
	}
	if has {
		if b.count[p]--; b.count[p] <= 0 {
			delete(b.count, p)
		}
	}
	return nil
}

// Batch applies puts and deletes through the counting Put and Delete.
func (b *boundedStore) Batch(ctx context.Context) (ds.Batch, error) {
	return ds.NewBasicBatch(b), nil
}

// recordsOf returns how many records are kept for peer p.
func (b *boundedStore) recordsOf(p peer.ID) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.count[peerKey(p)]
}
