package peerproto

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/fleetmirror/fleetmirror/agent/oci"
)

// TestWireBytes pins what agents of the previous version send and expect:
// a change here breaks rolling updates (see TestMixedVersions in test/e2e).
func TestWireBytes(t *testing.T) {
	p := netip.MustParseAddrPort("10.0.0.12:30120")
	for got, want := range map[string]string{
		PeerHeader:   "X-Fleetmirror-Peer",
		AnswerHeader: "X-Fleetmirror-Peer-Answer",
		WaitHeader:   "X-Fleetmirror-Wait",
		SourceHeader: "X-Fleetmirror-Source",
		PeerURL(p, oci.Request{Registry: "docker.io", Repository: "library/nginx"}, Manifests, "1.27"): "http://10.0.0.12:30120/v2/library/nginx/manifests/1.27?ns=docker.io",
		PeerURL(p, oci.Request{Repository: "app"}, Blobs, "sha256:abc"):                                "http://10.0.0.12:30120/v2/app/blobs/sha256:abc",
		URL("http://127.0.0.1:30120/", "app", Blobs, "sha256:abc", "r:5000"):                           "http://127.0.0.1:30120/v2/app/blobs/sha256:abc?ns=r:5000",
		ResumeRange(1048576): "bytes=1048576-",
		PeerSource([]netip.AddrPort{p, netip.MustParseAddrPort("10.0.0.13:30120")}): "peer 10.0.0.12:30120,10.0.0.13:30120",
		PeerSource(nil): "peer",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	if off, ok := ParseResumeRange(ResumeRange(42)); !ok || off != 42 {
		t.Errorf("ParseResumeRange(ResumeRange(42)) = %d, %v", off, ok)
	}
	if src, peers := ParseSource("peer 10.0.0.12:30120,10.0.0.13:30120"); src != SourcePeer || !slices.Equal(peers, []string{"10.0.0.12:30120", "10.0.0.13:30120"}) {
		t.Errorf("ParseSource: %q %q", src, peers)
	}
}
