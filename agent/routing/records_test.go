package routing

import (
	"context"
	"testing"
	"time"

	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/peerstore/pstoremem"
)

// TestProviderManagerLayout pins the kad-dht internals Withdraw and
// boundedStore rely on (see Withdraw): the datastore key a provider record
// is written under (providerKey) and the key of the provider manager's read
// cache (the multihash bytes as a string). If kad-dht changes either, this
// fails rather than Withdraw silently leaving this node in lookups.
func TestProviderManagerLayout(t *testing.T) {
	ctx := context.Background()
	self, other := genKey(t), genKey(t)
	selfID, _ := peer.IDFromPrivateKey(self)
	otherID, _ := peer.IDFromPrivateKey(other)
	ps, err := pstoremem.NewPeerstore()
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	dstore := dssync.MutexWrap(ds.NewMapDatastore())
	cache, err := newSyncLRU(16)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := records.NewProviderManager(selfID, ps, dstore, records.Cache(cache), records.ProvideValidity(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()

	mh := keyCID("sha256:1111111111111111111111111111111111111111111111111111111111111111").Hash()
	for _, id := range []peer.ID{selfID, otherID} {
		if err := pm.AddProvider(ctx, mh, peer.AddrInfo{ID: id}); err != nil {
			t.Fatal(err)
		}
		k := providerKey(mh, id)
		if has, err := dstore.Has(ctx, k); err != nil || !has {
			t.Fatalf("kad-dht no longer writes provider records under %s (has=%v, err=%v)", k, has, err)
		}
		if p, ok := providerOf(k); !ok || p != peerKey(id) {
			t.Fatalf("providerOf(%s) = %q, %v; want %q", k, p, ok, peerKey(id))
		}
	}
	if provs, err := pm.GetProviders(ctx, mh); err != nil || len(provs) != 2 {
		t.Fatalf("providers = %v, %v; want 2", provs, err)
	}
	if !cache.Contains(string(mh)) {
		t.Fatalf("kad-dht no longer caches provider sets under the multihash bytes; cache keys: %v", cache.Keys())
	}

	// What Withdraw does: delete the record and drop the cached set.
	if err := dstore.Delete(ctx, providerKey(mh, selfID)); err != nil {
		t.Fatal(err)
	}
	cache.Remove(string(mh))
	provs, err := pm.GetProviders(ctx, mh)
	if err != nil || len(provs) != 1 || provs[0].ID != otherID {
		t.Fatalf("after withdrawing self, providers = %v, %v; want only %s", provs, err, otherID)
	}
}
