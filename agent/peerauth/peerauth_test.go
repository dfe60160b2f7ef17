package peerauth

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

func testKey(t *testing.T, b byte) *Key {
	t.Helper()
	k, err := New(bytes.Repeat([]byte{b}, 64))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestNewRefusesShortSecrets(t *testing.T) {
	if _, err := New([]byte("  short\n")); err == nil || !strings.Contains(err.Error(), "at least 32") {
		t.Errorf("short secret: err = %v", err)
	}
	a, err := New([]byte(strings.Repeat("ab", 32) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := New([]byte(strings.Repeat("ab", 32)))
	if !bytes.Equal(a.PSK(), b.PSK()) {
		t.Error("a trailing newline (as a Secret file may have) changed the key")
	}
	if bytes.Equal(a.PSK(), a.mac) {
		t.Error("the PSK and the MAC key are the same bytes")
	}
}

func TestVerify(t *testing.T) {
	k, other := testKey(t, 1), testKey(t, 2)
	req := httptest.NewRequest(http.MethodGet, "/v2/library/nginx/manifests/1.27?ns=docker.io", nil)
	proof := k.Sign(req)
	now := time.Now()
	if got, err := k.Verify(req, now); err != nil || got != proof {
		t.Fatalf("Verify = %q, %v; want the proof", got, err)
	}
	for _, tc := range []struct {
		name string
		key  *Key
		edit func(*http.Request)
		now  time.Time
		want error
	}{
		{"other key", other, nil, now, ErrMAC},
		{"too late", k, nil, now.Add(MaxSkew + 2*time.Second), ErrExpired},
		{"from the future", k, nil, now.Add(-MaxSkew - 2*time.Second), ErrExpired},
		{"other path", k, func(r *http.Request) { r.URL.RawQuery = "ns=evil.example" }, now, ErrMAC},
		{"other method", k, func(r *http.Request) { r.Method = http.MethodHead }, now, ErrMAC},
		{"old agent", k, func(r *http.Request) { r.Header.Set(peerproto.PeerHeader, "1") }, now, ErrOld},
		{"none", k, func(r *http.Request) { r.Header.Del(peerproto.PeerHeader) }, now, ErrMissing},
		{"garbage", k, func(r *http.Request) { r.Header.Set(peerproto.PeerHeader, "v1 x y") }, now, ErrBad},
		{"huge", k, func(r *http.Request) { r.Header.Set(peerproto.PeerHeader, strings.Repeat("v", 4096)) }, now, ErrBad},
	} {
		r := req.Clone(req.Context())
		if tc.edit != nil {
			tc.edit(r)
		}
		if _, err := tc.key.Verify(r, tc.now); !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
	}
}

// The gate serves loopback and the mirror target's address without a
// proof, members with one (and proves its answers), and refuses the rest.
func TestGate(t *testing.T) {
	k := testKey(t, 1)
	var denied []string
	g := NewGate(k, WithLocal([]netip.Prefix{netip.MustParsePrefix("10.0.0.5/32"), netip.MustParsePrefix("10.244.3.0/30")}), WithDenied(func(r string) { denied = append(denied, r) }))
	h := g.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Docker-Content-Digest", "sha256:abc")
		io.Copy(w, strings.NewReader("content"))
	}))
	do := func(remote string, sign *Key, header string) (*http.Response, string) {
		req := httptest.NewRequest(http.MethodGet, "/v2/app/blobs/sha256:abc", nil)
		req.RemoteAddr = remote
		proof := ""
		if sign != nil {
			proof = sign.Sign(req)
		} else if header != "" {
			req.Header.Set(peerproto.PeerHeader, header)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Result(), proof
	}
	for _, remote := range []string{"127.0.0.1:40000", "[::1]:40000", "10.0.0.5:40000", "10.244.3.1:40000"} {
		if resp, _ := do(remote, nil, ""); resp.StatusCode != http.StatusOK {
			t.Errorf("node-local client %s: status %d", remote, resp.StatusCode)
		}
	}
	resp, proof := do("10.0.0.7:40000", k, "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("member: status %d", resp.StatusCode)
	}
	if err := k.Check(resp, proof); err != nil {
		t.Errorf("member's answer: %v", err)
	}
	if err := testKey(t, 2).Check(resp, proof); err == nil {
		t.Error("an answer checked with another key verified")
	}
	resp.Header.Set("Docker-Content-Digest", "sha256:other")
	if err := k.Check(resp, proof); err == nil {
		t.Error("an answer whose digest was altered verified")
	}
	for _, tc := range []struct {
		sign   *Key
		header string
		reason string
	}{{nil, "", DeniedStranger}, {nil, "1", DeniedOld}, {testKey(t, 3), "", DeniedProof}} {
		denied = nil
		resp, _ := do("10.0.0.9:40000", tc.sign, tc.header)
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "DENIED") {
			t.Errorf("%s: status %d body %s, want 403 DENIED", tc.reason, resp.StatusCode, body)
		}
		if len(denied) != 1 || denied[0] != tc.reason {
			t.Errorf("counted %v, want [%s]", denied, tc.reason)
		}
	}
	// An open network serves everyone, as agents before membership did.
	open := NewGate(nil).Wrap(http.NotFoundHandler())
	req := httptest.NewRequest(http.MethodGet, "/v2/app/blobs/sha256:abc", nil)
	req.RemoteAddr = "10.0.0.9:1"
	rec := httptest.NewRecorder()
	open.ServeHTTP(rec, req)
	if rec.Code != http.StatusNotFound {
		t.Errorf("open gate: status %d", rec.Code)
	}
}

func BenchmarkSignVerify(b *testing.B) {
	k, _ := New(bytes.Repeat([]byte{1}, 64))
	req := httptest.NewRequest(http.MethodGet, "/v2/library/nginx/blobs/sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08?ns=docker.io", nil)
	for b.Loop() {
		proof := k.Sign(req)
		if _, err := k.Verify(req, time.Now()); err != nil {
			b.Fatal(err)
		}
		h := http.Header{}
		k.Answer(h, proof, 200)
	}
}
