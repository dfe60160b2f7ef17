package fetch

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerauth"
)

// tagPeer answers one tag with its own manifest, as an agent would, behind
// the gate of key (nil: a stranger that answers anyone).
func tagPeer(t *testing.T, manifest []byte, key *peerauth.Key) *testPeer {
	t.Helper()
	h := http.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v2/team/app/manifests/v1" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Docker-Content-Digest", digest.FromBytes(manifest).String())
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Write(manifest)
	}))
	if key != nil {
		h = peerauth.NewGate(key).Wrap(h)
	}
	p := &testPeer{Server: httptest.NewServer(h)}
	t.Cleanup(p.Close)
	p.addr = netip.MustParseAddrPort(p.Listener.Addr().String())
	return p
}

// A tag's answer is believed only from a member, whatever address the
// lookup gave: a stranger's self-consistent manifest is skipped.
func TestTagAnswersOnlyFromMembers(t *testing.T) {
	key, _ := peerauth.New(bytes.Repeat([]byte{1}, 32))
	other, _ := peerauth.New(bytes.Repeat([]byte{2}, 32))
	theirs := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[{"digest":"sha256:evil"}]}`)
	ours := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}`)
	req := oci.Request{Registry: "docker.io", Repository: "team/app", Kind: oci.KindManifest, Tag: "v1"}
	const tagKey = "docker.io/team/app:v1"

	stranger, member := tagPeer(t, theirs, nil), tagPeer(t, ours, key)
	m := newFetcher(t, tagKey, []*testPeer{stranger, member}, WithPeerKey(key))
	man, err := m.Manifest(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(man.Body, ours) {
		t.Errorf("got manifest %s, want the member's", man.Body)
	}

	// A member of another cluster refuses us, and we it.
	m = newFetcher(t, tagKey, []*testPeer{tagPeer(t, theirs, other)}, WithPeerKey(key))
	if _, err := m.Manifest(context.Background(), req); !errors.Is(err, ErrNoSource) {
		t.Errorf("another cluster's member answered: err = %v, want ErrNoSource", err)
	}
}
