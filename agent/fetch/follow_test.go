package fetch

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// lateLeader answers like a peer serving a blob in flight whose own
// containerd has not received a byte yet: nothing, headers included, until
// release is closed, then the whole blob. It counts the requests it got.
func lateLeader(t *testing.T, blob []byte, release <-chan struct{}) (netip.AddrPort, *atomic.Int32) {
	t.Helper()
	var asked atomic.Int32
	good := newPeer(t, blob, good, 0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		if r.Header.Get(peerproto.WaitHeader) == "" {
			t.Errorf("the node followed was asked without %s", peerproto.WaitHeader)
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		good.Config.Handler.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return netip.MustParseAddrPort(srv.Listener.Addr().String()), &asked
}

// shortHeaders is a client whose header timeout is far below the follow
// wait, as the default one is.
func shortHeaders() *http.Client {
	return &http.Client{Transport: &http.Transport{ResponseHeaderTimeout: 100 * time.Millisecond}}
}

// The node a follower agreed to follow answers its first bytes only once
// its own containerd got them from upstream, later than the peer header
// timeout: the follower waits for it (up to the follow wait) instead of
// giving up on it, and streams the blob from it.
func TestFollowerWaitsForItsLeadersFirstBytes(t *testing.T) {
	blob := randomBlob(t, WholeBelow+1<<20)
	release := make(chan struct{})
	leader, _ := lateLeader(t, blob, release)
	// Another node in flight, as empty-handed: it must not be asked.
	other := newPeer(t, blob, stall, 0)
	m := newFetcher(t, digest.FromBytes(blob).String(), []*testPeer{other},
		WithHTTPClient(shortHeaders()), WithFollowWait(10*time.Second))
	time.AfterFunc(500*time.Millisecond, func() { close(release) })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := m.OpenBlobFrom(ctx, blobRequest(blob), leader, Wait{Blob: time.Second})
	if err != nil {
		t.Fatalf("follower gave up on its leader: %v", err)
	}
	defer s.Close()
	got, err := readAll(t, s)
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("read %d bytes, err %v; want the blob", len(got), err)
	}
	if len(s.Peers) != 1 || s.Peers[0] != leader {
		t.Errorf("streamed from %v, want the leader %s alone", s.Peers, leader)
	}
	if r := other.gotRanges(); len(r) != 0 {
		t.Errorf("a waiting follower was asked too: %q", r)
	}
}

// A leader that never sends a byte is given up after the follow wait, and
// one that refuses at once sends the follower upstream at once: in both
// cases without trying the other followers, which wait for the same
// leader and have nothing either.
func TestFollowerGoesUpstreamWhenItsLeaderFails(t *testing.T) {
	blob := randomBlob(t, WholeBelow+1<<20)
	never := make(chan struct{})
	silent, asked := lateLeader(t, blob, never)
	refusing := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(refusing.Close)
	for _, tt := range []struct {
		name   string
		leader netip.AddrPort
	}{
		{"silent", silent},
		{"refusing", netip.MustParseAddrPort(refusing.Listener.Addr().String())},
	} {
		t.Run(tt.name, func(t *testing.T) {
			other := newPeer(t, blob, stall, 0)
			m := newFetcher(t, digest.FromBytes(blob).String(), []*testPeer{other},
				WithHTTPClient(shortHeaders()), WithFollowWait(300*time.Millisecond))
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err := m.OpenBlobFrom(ctx, blobRequest(blob), tt.leader, Wait{Blob: time.Second})
			if !errors.Is(err, ErrNoSource) {
				t.Fatalf("err %v, want ErrNoSource (upstream)", err)
			}
			if ctx.Err() != nil {
				t.Error("the follower waited for the test's deadline, not the follow wait")
			}
			if r := other.gotRanges(); len(r) != 0 {
				t.Errorf("a waiting follower was asked: %q", r)
			}
		})
	}
	if asked.Load() != 1 {
		t.Errorf("the silent leader was asked %d times, want once", asked.Load())
	}
}
