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
	// Key is the cluster's key; nil runs the network open: every client
	// is served, as agents before membership did.
	Key *Key
	// Local are the networks, besides loopback, the node's containerd
	// reaches the registry from (the hosts of its mirror targets, and
	// what --local-clients adds).
	Local []netip.Prefix
	// Denied counts a refusal by reason; may be nil.
	Denied func(reason string)
	Log    *slog.Logger
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
			if g.Key == nil || g.local(req.RemoteAddr) {
				next.ServeHTTP(w, req)
				return
			}
			g.deny(w, req, DeniedStranger, ErrMissing)
			return
		}
		if g.Key == nil {
			next.ServeHTTP(w, req)
			return
		}
		proof, err := g.Key.Verify(req, time.Now())
		if err != nil {
			reason := DeniedProof
			if err == ErrOld {
				reason = DeniedOld
			}
			g.deny(w, req, reason, err)
			return
		}
		next.ServeHTTP(&answerWriter{ResponseWriter: w, key: g.Key, proof: proof}, req)
	})
}

func (g *Gate) local(remote string) bool {
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
	for _, l := range g.Local {
		if l.Contains(a) {
			return true
		}
	}
	return false
}

func (g *Gate) deny(w http.ResponseWriter, req *http.Request, reason string, err error) {
	if g.Denied != nil {
		g.Denied(reason)
	}
	if g.Log != nil {
		g.Log.Debug("refused a registry request", "client", req.RemoteAddr, "path", req.URL.Path, "reason", reason)
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
