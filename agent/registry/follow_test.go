package registry

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/mirror"
	"github.com/fleetmirror/fleetmirror/agent/store"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

// noHolds is a Holder that holds nothing in flight.
type noHolds struct{}

func (noHolds) Hold(string)         {}
func (noHolds) Holding(string) bool { return false }

// A node that waits for the node it agreed to follow has advertised
// nothing yet, but a node whose view of the claimants picked it instead
// is served the blob in flight from its containerd's ingest as it
// arrives, not sent upstream with a 404 (20-node bursts: a third of the
// upstream fetches). A node that neither holds nor follows the blob still
// answers 404.
func TestFollowerServesInFlightWhileItWaits(t *testing.T) {
	blob := randomBytes(t, 3000)
	d := digest.FromBytes(blob)
	dir := t.TempDir()
	ing := filepath.Join(dir, "ingest", "x")
	if err := os.MkdirAll(ing, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string][]byte{
		"ref": []byte("k8s.io/1/layer-" + d.String()), "total": []byte(strconv.Itoa(len(blob))), "data": blob,
	} {
		if err := os.WriteFile(filepath.Join(ing, name), body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	reg, err := New(storetest.NewMemory(), WithInFlight(store.NewInFlight(dir, time.Second), noHolds{}))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	url := srv.URL + "/v2/team/app/blobs/" + d.String() + "?ns=example.com"
	hdr := []string{mirror.PeerHeader, "1", mirror.WaitHeader, "200ms"}

	if resp, _ := get(t, http.MethodGet, url, hdr...); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("neither holding nor following: status %d, want 404", resp.StatusCode)
	}
	reg.follows.add(d, 1)
	resp, body := get(t, http.MethodGet, url, hdr...)
	if resp.StatusCode != http.StatusOK || string(body) != string(blob) {
		t.Fatalf("following: status %d, %d bytes; want 200 and the blob", resp.StatusCode, len(body))
	}
	reg.follows.add(d, -1)
	if reg.follows.has(d) {
		t.Error("the blob is still counted as followed after the wait ended")
	}
}
