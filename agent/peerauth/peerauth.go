// Package peerauth proves membership between the agents of one cluster.
//
// The agents share one secret (a Kubernetes Secret mounted into every
// agent). Two keys are derived from it: the libp2p private-network key,
// so a process without the secret cannot even complete a connection to
// the DHT, and an HMAC key for the registry's peer requests. A peer
// request carries a MAC over its method, URI and time; the answer carries
// a MAC over the request's MAC, its status and the content digest it
// claims, so a tag answer is believed only from a member, whatever
// address a record pointed at.
//
// HMAC-SHA256 over a few hundred bytes costs about a microsecond a side,
// so membership costs the pull path nothing measurable; mutual TLS would
// add a handshake per connection and encryption of every blob byte, which
// digests already make unnecessary for integrity.
package peerauth

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// MaxSkew is how far a request's time may be from ours. Nodes keep their
// clocks within a second or so by NTP; the window bounds how long a MAC
// seen on the wire can be replayed, and then only for the same URI.
const MaxSkew = 2 * time.Minute

// MinSecret and maxSecret bound the shared secret's length.
const (
	MinSecret = 32
	maxSecret = 4096
)

const version = "v1"

// Errors of Verify; each names what a refused client should fix.
var (
	ErrMissing = errors.New("no " + peerproto.PeerHeader + " proof: only the node's own containerd and the cluster's agents may use this registry")
	ErrOld     = errors.New(peerproto.PeerHeader + " is an agent's without membership (an older version, or one without the cluster's network key): upgrade it or give it the key")
	ErrBad     = errors.New(peerproto.PeerHeader + " proof is malformed")
	ErrExpired = errors.New(peerproto.PeerHeader + " proof is too old or from the future: check the node clocks (NTP)")
	ErrMAC     = errors.New(peerproto.PeerHeader + " proof does not verify: the client has another network key (a key rotation in progress, or not a member)")
)

// Key is the cluster's shared secret, as the keys derived from it.
type Key struct {
	psk [32]byte
	mac []byte
}

// New derives the keys from a shared secret.
func New(secret []byte) (*Key, error) {
	secret = bytes.TrimSpace(secret)
	if len(secret) < MinSecret {
		return nil, fmt.Errorf("network key is %d bytes, want at least %d (e.g. 64 hex characters from `openssl rand -hex 32`)", len(secret), MinSecret)
	}
	if len(secret) > maxSecret {
		return nil, fmt.Errorf("network key is %d bytes, want at most %d", len(secret), maxSecret)
	}
	k := &Key{mac: derive(secret, "fleetmirror/peer-mac/v1")}
	copy(k.psk[:], derive(secret, "fleetmirror/pnet/v1"))
	return k, nil
}

// Load reads the shared secret from a file (a mounted Secret's key).
func Load(path string) (*Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the network key: %w", err)
	}
	k, err := New(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func derive(secret []byte, label string) []byte {
	h := hmac.New(sha256.New, secret)
	h.Write([]byte(label))
	return h.Sum(nil)
}

// PSK is the libp2p private-network key.
func (k *Key) PSK() []byte { return k.psk[:] }

// Sign marks req as a member's peer request. It returns the proof, which
// Check needs to verify the answer.
func (k *Key) Sign(req *http.Request) string {
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	mac := k.requestMAC(req.Method, req.URL.RequestURI(), ts)
	req.Header.Set(peerproto.PeerHeader, version+" "+ts+" "+mac)
	return mac
}

func (k *Key) requestMAC(method, uri, ts string) string {
	h := hmac.New(sha256.New, k.mac)
	h.Write([]byte("request\n" + method + "\n" + uri + "\n" + ts))
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}

// Verify checks req's proof and returns its MAC, for Answer. The header
// is bounded before it is parsed.
func (k *Key) Verify(req *http.Request, now time.Time) (string, error) {
	v := req.Header.Get(peerproto.PeerHeader)
	switch {
	case v == "":
		return "", ErrMissing
	case v == "1":
		return "", ErrOld
	case len(v) > 128:
		return "", ErrBad
	}
	parts := strings.Split(v, " ")
	if len(parts) != 3 || parts[0] != version {
		return "", ErrBad
	}
	ts, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil {
		return "", ErrBad
	}
	if d := now.Sub(time.Unix(ts, 0)); d > MaxSkew || d < -MaxSkew {
		return "", ErrExpired
	}
	want := k.requestMAC(req.Method, req.URL.RequestURI(), parts[1])
	if !hmac.Equal([]byte(want), []byte(parts[2])) {
		return "", ErrMAC
	}
	return want, nil
}

// Answer proves to the requester that the answer comes from a member. It
// binds the status and the content digest the answer claims; the body is
// then checked against that digest by the requester as always.
func (k *Key) Answer(h http.Header, proof string, status int) {
	h.Set(peerproto.AnswerHeader, k.answerMAC(proof, status, h.Get("Docker-Content-Digest")))
}

func (k *Key) answerMAC(proof string, status int, dgst string) string {
	h := hmac.New(sha256.New, k.mac)
	h.Write([]byte("answer\n" + proof + "\n" + strconv.Itoa(status) + "\n" + dgst))
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}

// Check verifies that resp answers the request signed with proof and
// comes from a member.
func (k *Key) Check(resp *http.Response, proof string) error {
	got := resp.Header.Get(peerproto.AnswerHeader)
	if got == "" {
		return errors.New("the answer carries no membership proof: the peer is not a member (or an older agent)")
	}
	want := k.answerMAC(proof, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
	if !hmac.Equal([]byte(want), []byte(got)) {
		return errors.New("the answer's membership proof does not verify: the peer is not a member, or the answer was altered")
	}
	return nil
}
