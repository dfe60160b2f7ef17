// Package web is the agent's debug page at /debug/web: what the node
// mirrors and whether peers really serve it (Last Mirror Success, peers,
// advertised keys, requests by outcome), and Measure Image Pull, which pulls
// an image through the node's own mirror without writing to containerd.
// Mirroring fails silently by design (containerd falls back to upstream), so
// this page is where a person sees that it works.
package web

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetmirror/fleetmirror/agent/routing"
)

// Path is where the page is mounted.
const Path = "/debug/web/"

//go:embed templates/index.html
var indexHTML string

//go:embed static
var staticFiles embed.FS

var indexTmpl = template.Must(template.New("index").Funcs(template.FuncMap{"bytes": formatBytes, "percent": percent}).Parse(indexHTML))

// Router is what the page needs of the node's router.
type Router interface {
	// Peers lists the connected peers with their registry addresses.
	Peers() []routing.Peer
	// Lookup streams the registry addresses of peers holding key.
	Lookup(ctx context.Context, key string, count int) (<-chan netip.AddrPort, error)
}

// Keys is what the page needs of the node's store.
type Keys interface {
	// Keys lists the tag keys and digests the node holds.
	Keys() []string
}

// PrepStatus reports the node's containerd-prep check: whether the node is
// prepared, and a one-line detail saying what was found or what is wrong.
type PrepStatus func() (ok bool, detail string)

// CanaryStatus reports the node's canary pull (agent/canary): state is
// ok, failed, pending or disabled, detail one line saying when it last ran
// and, when it failed, why.
type CanaryStatus func() (state, detail string)

// Config is the agent configuration the page shows; RegistryURL is also
// where Measure Image Pull sends its requests.
type Config struct {
	// RegistryURL is the node's own registry as containerd reaches it,
	// e.g. http://127.0.0.1:30120.
	RegistryURL        string
	MirroredRegistries []string // hosts; empty means all
	MirrorTargets      []string
	ResolveTimeout     time.Duration
	ResolveRetries     int
	Version            string
}

// Web serves the debug page, its JSON stats and Measure Image Pull.
type Web struct {
	router   Router
	store    Keys
	gatherer prometheus.Gatherer
	cfg      Config
	prep     PrepStatus
	canary   CanaryStatus
	log      *slog.Logger
	client   *http.Client
	now      func() time.Time

	// One measurement at a time: each pulls a whole image.
	measuring sync.Mutex
}

// Option configures a Web.
type Option func(*Web)

// WithPrepStatus sets the node's prep check; without it the page says
// "not configured".
func WithPrepStatus(p PrepStatus) Option { return func(w *Web) { w.prep = p } }

// WithCanaryStatus sets the node's canary; without it the page says
// "disabled".
func WithCanaryStatus(c CanaryStatus) Option { return func(w *Web) { w.canary = c } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(w *Web) { w.log = l } }

// New returns the debug page of the node whose peers and lookups come
// from router, advertised keys from store and stats from gatherer; cfg is
// the configuration shown, and its RegistryURL the registry measured.
func New(router Router, store Keys, gatherer prometheus.Gatherer, cfg Config, opts ...Option) (*Web, error) {
	switch {
	case router == nil:
		return nil, errors.New("web: a router is required")
	case store == nil:
		return nil, errors.New("web: a store is required")
	case gatherer == nil:
		return nil, errors.New("web: a metrics gatherer is required")
	}
	w := &Web{router: router, store: store, gatherer: gatherer, cfg: cfg, log: slog.Default(), now: time.Now}
	for _, o := range opts {
		o(w)
	}
	u, err := url.Parse(w.cfg.RegistryURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("web: Config.RegistryURL must be the node's registry URL, e.g. http://127.0.0.1:30120")
	}
	w.client = &http.Client{Transport: &http.Transport{
		// The node's own registry only: never an environment proxy.
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		ResponseHeaderTimeout: 30 * time.Second,
		DisableCompression:    true,
		MaxIdleConnsPerHost:   4,
	}}
	return w, nil
}

// Handler serves everything under Path: the page, stats, measure and
// static files. Every action (any method but GET, HEAD and OPTIONS:
// Measure Image Pull) is refused to cross-origin requests, so a page
// elsewhere cannot make a visitor's browser run it (see crossOrigin).
func (w *Web) Handler() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFiles, "static")
	mux.Handle("GET "+Path+"static/", http.StripPrefix(Path+"static/", http.FileServerFS(static)))
	mux.HandleFunc("GET "+Path+"stats", w.serveStats)
	mux.HandleFunc("POST "+Path+"measure", w.serveMeasure)
	mux.HandleFunc("GET "+Path+"{$}", w.servePage)
	mux.Handle("GET /debug/web", http.RedirectHandler(Path, http.StatusMovedPermanently))
	// The page has a listener of its own (--debug-web-addr): its root is
	// the page.
	mux.Handle("GET /{$}", http.RedirectHandler(Path, http.StatusFound))
	return crossOrigin(mux)
}

// crossOrigin refuses unsafe requests a browser marks as sent by another
// site (Sec-Fetch-Site other than same-origin or none: same-site too,
// since another port or subdomain of a node is another program), or whose
// Origin is not the Host asked for. Through kubectl port-forward the page
// is its own origin (localhost:<port>), so it keeps working; curl sends
// neither header and is let through.
func crossOrigin(h http.Handler) http.Handler {
	p := http.NewCrossOriginProtection()
	p.SetDenyHandler(http.HandlerFunc(func(rw http.ResponseWriter, req *http.Request) {
		why := "its Origin " + req.Header.Get("Origin") + " is not this page's " + req.Host
		if site := req.Header.Get("Sec-Fetch-Site"); site != "" {
			why = "the browser sent it from another site (Sec-Fetch-Site: " + site + ")"
		}
		writeJSON(rw, http.StatusForbidden, errorBody{"refused: " + req.Method + " " + req.URL.Path + " acts on this node, and " + why +
			"; use the debug page itself (e.g. through kubectl port-forward) or curl"})
	}))
	return p.Handler(h)
}

func (w *Web) servePage(rw http.ResponseWriter, req *http.Request) {
	rw.Header().Set("Content-Type", "text/html; charset=utf-8")
	rw.Header().Set("Cache-Control", "no-store")
	if err := indexTmpl.Execute(rw, w.Stats(req.Context())); err != nil {
		w.log.WarnContext(req.Context(), "rendering debug page", "err", err)
	}
}

func (w *Web) serveStats(rw http.ResponseWriter, req *http.Request) {
	writeJSON(rw, http.StatusOK, w.Stats(req.Context()))
}

// maxImageRef bounds what the measure form accepts.
const maxImageRef = 512

func (w *Web) serveMeasure(rw http.ResponseWriter, req *http.Request) {
	req.Body = http.MaxBytesReader(rw, req.Body, 4096)
	image := req.FormValue("image")
	if image == "" || len(image) > maxImageRef {
		writeJSON(rw, http.StatusBadRequest, errorBody{"give an image reference in the form field \"image\", e.g. docker.io/library/nginx:1.27"})
		return
	}
	if !w.measuring.TryLock() {
		writeJSON(rw, http.StatusTooManyRequests, errorBody{"another measurement is running on this node; try again when it ends"})
		return
	}
	defer w.measuring.Unlock()
	ctx, cancel := context.WithTimeout(req.Context(), measureTimeout)
	defer cancel()
	res, err := w.Measure(ctx, image)
	if err != nil {
		writeJSON(rw, http.StatusBadRequest, errorBody{err.Error()})
		return
	}
	writeJSON(rw, http.StatusOK, res)
}

type errorBody struct {
	Error string `json:"error"`
}

func writeJSON(rw http.ResponseWriter, status int, v any) {
	rw.Header().Set("Content-Type", "application/json")
	rw.Header().Set("Cache-Control", "no-store")
	rw.WriteHeader(status)
	enc := json.NewEncoder(rw)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
