package fetch

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// behaviour is how a test peer answers a blob GET after the first
// `after` bytes of its answer.
type behaviour int

const (
	good     behaviour = iota
	breakOff           // closes the connection
	stall              // sends nothing more until the client gives up
	drip               // sends a byte every 50ms
	wrong              // sends the whole blob with one byte changed
)

// testPeer is a real HTTP server that serves one blob the way a peer
// agent does, or misbehaves.
type testPeer struct {
	*httptest.Server
	addr   netip.AddrPort
	mu     sync.Mutex
	ranges []string // Range headers received, "" for none
}

func newPeer(t *testing.T, blob []byte, b behaviour, after int) *testPeer {
	t.Helper()
	p := &testPeer{}
	d := digest.FromBytes(blob)
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/blobs/"+d.String()) {
			http.NotFound(w, r)
			return
		}
		p.mu.Lock()
		p.ranges = append(p.ranges, r.Header.Get("Range"))
		p.mu.Unlock()
		w.Header().Set("Docker-Content-Digest", d.String())
		if b == good {
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
			return
		}
		body := blob
		if b == wrong {
			body = bytes.Clone(blob)
			body[len(body)/2] ^= 0xff
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		w.Write(body[:after])
		w.(http.Flusher).Flush()
		switch b {
		case wrong:
			w.Write(body[after:])
		case breakOff:
			panic(http.ErrAbortHandler)
		case stall:
			<-r.Context().Done()
		case drip:
			for i := after; i < len(body); i++ {
				select {
				case <-r.Context().Done():
					return
				case <-time.After(50 * time.Millisecond):
				}
				w.Write(body[i : i+1])
				w.(http.Flusher).Flush()
			}
		}
	}))
	t.Cleanup(p.Close)
	p.addr = netip.MustParseAddrPort(p.Listener.Addr().String())
	return p
}

func (p *testPeer) gotRanges() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.ranges...)
}

func randomBlob(t *testing.T, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	r := rand.NewChaCha8([32]byte{byte(size), byte(size >> 8), byte(size >> 16)})
	r.Read(b)
	return b
}

// newFetcher returns a Fetcher on node self whose router finds peers in the
// given order as holders of key.
func newFetcher(t *testing.T, key string, peers []*testPeer, opts ...Option) *Fetcher {
	t.Helper()
	addrs := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}
	for _, p := range peers {
		addrs = append(addrs, p.addr)
	}
	rs := routing.NewMemory(addrs...)
	for i := range peers {
		if err := rs[i+1].Advertise(context.Background(), []string{key}); err != nil {
			t.Fatal(err)
		}
	}
	opts = append([]Option{WithStallTimeout(300 * time.Millisecond), WithResolveTimeout(50 * time.Millisecond)}, opts...)
	m, err := New(rs[0], opts...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func blobRequest(blob []byte) oci.Request {
	return oci.Request{Registry: "example.com", Repository: "team/app", Kind: oci.KindBlob, Digest: digest.FromBytes(blob)}
}

// openStream opens blob from m within a deadline that ends the test's
// waits if a stall bound fails; the stream is closed with the test.
func openStream(t *testing.T, m *Fetcher, blob []byte) (*BlobStream, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	s, err := m.OpenBlob(ctx, blobRequest(blob))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, ctx
}

// readAll reads s as the registry does, returning what it got until the
// first error.
func readAll(t *testing.T, s *BlobStream) ([]byte, error) {
	t.Helper()
	var out bytes.Buffer
	_, err := io.Copy(&out, s)
	return out.Bytes(), err
}

func TestStreamFromPeers(t *testing.T) {
	big := WholeBelow + 3<<20 + 17
	tests := []struct {
		name   string
		peers  []behaviour
		after  int
		served []int // peers that must have been asked, in order
		resume string
	}{
		{"one good peer", []behaviour{good}, 0, []int{0}, ""},
		{"peer breaks off mid-blob", []behaviour{breakOff, good}, 1 << 20, []int{0, 1}, "bytes=1048576-"},
		{"peer stalls mid-blob", []behaviour{stall, good}, 2 << 20, []int{0, 1}, "bytes=2097152-"},
		{"peer drips mid-blob", []behaviour{drip, good}, 1 << 20, []int{0, 1}, ""},
		{"second peer ignores Range", []behaviour{breakOff, breakOff, good}, 1 << 20, []int{0, 2}, "bytes=1048576-"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob := randomBlob(t, big)
			var peers []*testPeer
			for i, b := range tt.peers {
				after := tt.after
				if i > 0 && b != good {
					after = tt.after / 2 // resumed at tt.after: breaks off at once
				}
				peers = append(peers, newPeer(t, blob, b, after))
			}
			m := newFetcher(t, digest.FromBytes(blob).String(), peers)
			s, _ := openStream(t, m, blob)
			if s.Descriptor.Size != int64(big) {
				t.Errorf("size %d, want %d", s.Descriptor.Size, big)
			}
			got, err := readAll(t, s)
			if err != nil {
				t.Fatalf("reading: %v", err)
			}
			if !bytes.Equal(got, blob) {
				t.Fatalf("got %d bytes that differ from the blob", len(got))
			}
			if len(s.Peers) != len(tt.served) {
				t.Errorf("peers used %v, want %d of them", s.Peers, len(tt.served))
			}
			for i, pi := range tt.served {
				if i < len(s.Peers) && s.Peers[i] != peers[pi].addr {
					t.Errorf("peer %d used was %s, want %s", i, s.Peers[i], peers[pi].addr)
				}
			}
			if tt.resume != "" {
				last := peers[len(peers)-1].gotRanges()
				if len(last) != 1 || last[0] != tt.resume {
					t.Errorf("last peer got Range %q, want %q", last, tt.resume)
				}
			}
		})
	}
}

// A wrong blob is never handed out whole: the read that would complete it
// fails, its peers are skipped next time, and the retry succeeds.
func TestStreamMismatchHoldsBackTheEnd(t *testing.T) {
	blob := randomBlob(t, WholeBelow+1<<20)
	liar := newPeer(t, blob, wrong, 1<<20)
	honest := newPeer(t, blob, good, 0)
	m := newFetcher(t, digest.FromBytes(blob).String(), []*testPeer{liar, honest}, WithPeers(1))
	ctx := context.Background()

	s, err := m.OpenBlob(ctx, blobRequest(blob))
	if err != nil {
		t.Fatal(err)
	}
	got, err := readAll(t, s)
	s.Close()
	if !errors.Is(err, ErrMismatch) {
		t.Fatalf("reading a wrong blob: err %v, want ErrMismatch", err)
	}
	if len(got) >= len(blob) {
		t.Fatalf("handed out %d of %d bytes of a wrong blob: the end must be held back", len(got), len(blob))
	}

	// containerd's retry: the liar is not asked again.
	s, err = m.OpenBlob(ctx, blobRequest(blob))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err = readAll(t, s)
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("retry: err %v, %d bytes, equal %v", err, len(got), bytes.Equal(got, blob))
	}
	if len(s.Peers) != 1 || s.Peers[0] != honest.addr {
		t.Errorf("retry used %v, want only %s", s.Peers, honest.addr)
	}
	if n := len(liar.gotRanges()); n != 1 {
		t.Errorf("the lying peer was asked %d times, want once", n)
	}
}

// Small blobs are verified before OpenBlob returns: a lying peer costs
// nothing but a second peer.
func TestSmallBlobVerifiedBeforeFirstByte(t *testing.T) {
	blob := randomBlob(t, 64<<10)
	liar := newPeer(t, blob, wrong, 100)
	honest := newPeer(t, blob, good, 0)
	m := newFetcher(t, digest.FromBytes(blob).String(), []*testPeer{liar, honest})
	s, err := m.OpenBlob(context.Background(), blobRequest(blob))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := readAll(t, s)
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("err %v, equal %v", err, bytes.Equal(got, blob))
	}
	if len(s.Peers) != 1 || s.Peers[0] != honest.addr {
		t.Errorf("served by %v, want %s", s.Peers, honest.addr)
	}
	if !m.bad.has(digest.FromBytes(blob), liar.addr) {
		t.Error("the lying peer is not remembered")
	}
}

// When every peer fails mid-blob the stream ends in an error, short of the
// end, and within the stall timeouts.
func TestStreamAllPeersFail(t *testing.T) {
	blob := randomBlob(t, WholeBelow+1<<20)
	a := newPeer(t, blob, breakOff, 1<<20)
	b := newPeer(t, blob, stall, 0)
	m := newFetcher(t, digest.FromBytes(blob).String(), []*testPeer{a, b})
	s, ctx := openStream(t, m, blob)
	got, err := readAll(t, s)
	if !errors.Is(err, ErrNoSource) {
		t.Fatalf("err %v, want ErrNoSource", err)
	}
	if len(got) != 1<<20 {
		t.Errorf("got %d bytes before the error, want the %d the first peer sent", len(got), 1<<20)
	}
	if ctx.Err() != nil {
		t.Error("the stream waited for the test's deadline instead of its stall timeout")
	}
}

func TestOpenBlobMiss(t *testing.T) {
	blob := randomBlob(t, 1000)
	m := newFetcher(t, "sha256:"+strings.Repeat("0", 64), nil)
	if _, err := m.OpenBlob(context.Background(), blobRequest(blob)); !errors.Is(err, ErrNoSource) {
		t.Fatalf("err %v, want ErrNoSource", err)
	}
}

// A peer that served a manifest is asked for its blobs when the lookup
// finds nobody in time.
func TestHintedPeerWhenLookupMisses(t *testing.T) {
	blob := randomBlob(t, 1000)
	p := newPeer(t, blob, good, 0)
	m := newFetcher(t, "unrelated", []*testPeer{p})
	m.hints.learn(p.addr, []byte(`{"layers":[{"digest":"`+digest.FromBytes(blob).String()+`"}]}`))
	s, err := m.OpenBlob(context.Background(), blobRequest(blob))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, _ := readAll(t, s); !bytes.Equal(got, blob) {
		t.Fatal("wrong bytes")
	}
}

// TestRefusesAbsurdSizes: a peer that claims a blob larger than any real
// one (peerproto.MaxBlobSize) is not believed, for a HEAD or a GET; the next source
// (here none: ErrNoSource, so containerd goes upstream) is used instead.
func TestRefusesAbsurdSizes(t *testing.T) {
	blob := randomBlob(t, 1000)
	d := digest.FromBytes(blob)
	for _, tt := range []struct {
		claim int64
		ok    bool
	}{{peerproto.MaxBlobSize, true}, {peerproto.MaxBlobSize + 1, false}, {1 << 62, false}} {
		p := &testPeer{}
		p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Header().Set("Content-Length", strconv.FormatInt(tt.claim, 10))
			w.WriteHeader(http.StatusOK)
			if r.Method == http.MethodGet {
				w.Write(blob) // then the handler ends, far short of its claim
			}
		}))
		t.Cleanup(p.Close)
		p.addr = netip.MustParseAddrPort(p.Listener.Addr().String())
		m := newFetcher(t, d.String(), []*testPeer{p})

		desc, err := m.BlobHead(context.Background(), blobRequest(blob))
		if tt.ok != (err == nil) || (tt.ok && desc.Size != tt.claim) {
			t.Errorf("HEAD claiming %d bytes: size %d, err %v; want believed: %v", tt.claim, desc.Size, err, tt.ok)
		}
		if tt.ok {
			continue
		}
		if s, err := m.OpenBlob(context.Background(), blobRequest(blob)); !errors.Is(err, ErrNoSource) {
			if s != nil {
				s.Close()
			}
			t.Errorf("GET claiming %d bytes: err %v, want ErrNoSource", tt.claim, err)
		}
	}
}
