package peerauth

import (
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// Gate admits the two kinds of client the registry serves: the node's own
// containerd (from loopback or an address the node's mirror target names)
// and members' peer requests. Everyone else gets a 403 that says why.
type Gate struct {
	// key is the cluster's key; nil runs the network open: every client
	// is served, as agents before membership did.
	key *Key
	// local are the networks, besides loopback, the node's containerd
	// reaches the registry from (the hosts of its mirror targets, and
	// what --local-clients adds).
	local  []netip.Prefix
	denied func(reason string) // counts a refusal by reason; may be nil
	log    *slog.Logger        // may be nil
}

// GateOption configures a Gate.
type GateOption func(*Gate)

// WithLocal adds the networks, besides loopback, that the node's own
// containerd reaches the registry from.
func WithLocal(p []netip.Prefix) GateOption { return func(g *Gate) { g.local = p } }

// WithDenied has each refusal counted by reason.
func WithDenied(f func(reason string)) GateOption { return func(g *Gate) { g.denied = f } }

// WithLogger logs refusals at debug level.
func WithLogger(l *slog.Logger) GateOption { return func(g *Gate) { g.log = l } }

// NewGate returns a Gate for the cluster's key; a nil key runs the network
// open.
func NewGate(key *Key, opts ...GateOption) *Gate {
	g := &Gate{key: key}
	for _, o := range opts {
		o(g)
	}
	return g
}

// Reasons a request is denied, as counted.
const (
	DeniedStranger = "stranger"
	DeniedOld      = "old-agent"
	DeniedProof    = "bad-proof"
)

// Wrap returns next behind the gate.
func (g *Gate) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Header.Get(peerproto.PeerHeader) == "" {
			if g.key == nil || g.isLocal(req.RemoteAddr) {
				next.ServeHTTP(w, req)
				return
			}
			g.deny(w, req, DeniedStranger, ErrMissing)
			return
		}
		if g.key == nil {
			next.ServeHTTP(w, req)
			return
		}
		proof, err := g.key.Verify(req, time.Now())
		if err != nil {
			reason := DeniedProof
			if err == ErrOld {
				reason = DeniedOld
			}
			g.deny(w, req, reason, err)
			return
		}
		next.ServeHTTP(&answerWriter{ResponseWriter: w, key: g.key, proof: proof}, req)
	})
}

func (g *Gate) isLocal(remote string) bool {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		host, _, splitErr := net.SplitHostPort(remote)
		a, perr := netip.ParseAddr(host)
		if splitErr != nil || perr != nil {
			return false
		}
		ap = netip.AddrPortFrom(a, 0)
	}
	a := ap.Addr().Unmap()
	if a.IsLoopback() {
		return true
	}
	for _, l := range g.local {
		if l.Contains(a) {
			return true
		}
	}
	return false
}

func (g *Gate) deny(w http.ResponseWriter, req *http.Request, reason string, err error) {
	if g.denied != nil {
		g.denied(reason)
	}
	if g.log != nil {
		g.log.Debug("refused a registry request", "client", req.RemoteAddr, "path", req.URL.Path, "reason", reason)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusForbidden)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": "DENIED", "message": err.Error()}}})
}

// answerWriter adds the answer's proof when its status is written.
type answerWriter struct {
	http.ResponseWriter
	key   *Key
	proof string
	wrote bool
}

func (a *answerWriter) WriteHeader(code int) {
	if !a.wrote && code >= 200 {
		a.wrote = true
		a.key.Answer(a.Header(), a.proof, code)
	}
	a.ResponseWriter.WriteHeader(code)
}

func (a *answerWriter) Write(p []byte) (int, error) {
	if !a.wrote {
		a.WriteHeader(http.StatusOK)
	}
	return a.ResponseWriter.Write(p)
}

// ReadFrom keeps the server's sendfile path for blobs read from disk.
func (a *answerWriter) ReadFrom(r io.Reader) (int64, error) {
	if !a.wrote {
		a.WriteHeader(http.StatusOK)
	}
	if rf, ok := a.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(a.ResponseWriter, r)
}

// Unwrap lets http.ResponseController reach the connection (flushes,
// deadlines).
func (a *answerWriter) Unwrap() http.ResponseWriter { return a.ResponseWriter }

func (a *answerWriter) Flush() {
	if !a.wrote {
		a.WriteHeader(http.StatusOK)
	}
	if f, ok := a.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
