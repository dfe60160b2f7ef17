package routing

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Hosts without the cluster's key, one with another key and one with
// none, can neither connect to the members nor get a record into their
// lookups.
func TestPrivateNetwork(t *testing.T) {
	const tag = "docker.io/library/nginx:1.27"
	key := bytes.Repeat([]byte{1}, 32)
	port, lns := reserve(t, 4)
	boot := StaticBootstrapper{Entries: []string{lns[0].Addr().String()}}
	a := startNode(t, lns[0], port, boot, WithNetworkKey(key))
	b := startNode(t, lns[1], port, boot, WithNetworkKey(key))
	waitJoined(t, a, b)
	wrong := startNode(t, lns[2], port, boot, WithNetworkKey(bytes.Repeat([]byte{2}, 32)))
	open := startNode(t, lns[3], port, boot)

	for _, s := range []*node{wrong, open} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := s.host.Connect(ctx, peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()})
		cancel()
		if err == nil {
			t.Errorf("%s connected to a member without the key", s.ip)
		}
		if err := s.Advertise(context.Background(), []string{tag}); err != nil {
			t.Logf("%s advertise: %v", s.ip, err)
		}
	}
	if err := a.Advertise(context.Background(), []string{tag}); err != nil {
		t.Fatal(err)
	}
	waitFound(t, b, tag, a.reg)
	// The strangers' bootstrap loops kept trying meanwhile.
	for _, n := range []*node{a, b} {
		for _, p := range n.Peers() {
			if p.ID == wrong.ID().String() || p.ID == open.ID().String() {
				t.Errorf("%s lists stranger %s as a peer", n.ip, p.Address)
			}
		}
		if got := n.dstore.recordsOf(wrong.ID()) + n.dstore.recordsOf(open.ID()); got != 0 {
			t.Errorf("%s keeps %d records of strangers", n.ip, got)
		}
	}
}

func TestBoundedStoreCountsPerPeer(t *testing.T) {
	ctx := context.Background()
	self, other := peer.ID("self-peer"), peer.ID("other-peer")
	b := newBoundedStore(dssync.MutexWrap(ds.NewMapDatastore()), self, 3)
	put := func(p peer.ID, i int) error {
		return b.Put(ctx, ds.NewKey(fmt.Sprintf("/providers/KEY%d/%s", i, peerKey(p))), []byte{1})
	}
	for i := range 3 {
		if err := put(other, i); err != nil {
			t.Fatal(err)
		}
	}
	// A refresh of a record it has is no new record.
	if err := put(other, 0); err != nil {
		t.Errorf("refreshing a kept record: %v", err)
	}
	if err := put(other, 3); !errors.Is(err, errTooManyRecords) {
		t.Errorf("fourth record: err = %v, want errTooManyRecords", err)
	}
	for i := range 10 {
		if err := put(self, i); err != nil {
			t.Errorf("own record %d: %v", i, err)
		}
	}
	// Expiry deletes through a batch, as the provider manager's GC may.
	batch, err := b.Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := batch.Delete(ctx, ds.NewKey("/providers/KEY1/"+peerKey(other))); err != nil {
		t.Fatal(err)
	}
	if err := batch.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if got := b.recordsOf(other); got != 2 {
		t.Errorf("records after a delete = %d, want 2", got)
	}
	if err := put(other, 3); err != nil {
		t.Errorf("a record after room was made: %v", err)
	}
}
