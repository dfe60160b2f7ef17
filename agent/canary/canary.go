// Package canary proves the node's mirror path end to end: the agent asks
// its node's containerd, through the CRI image service as the kubelet
// does, to pull a tiny image that only this agent serves, under a registry
// name nothing else could answer (Registry). The pull succeeds only if
// containerd read the hosts.toml files under --certs-dir and reached the
// agent at its mirror target, whatever path containerd pulls by (CRI's
// own, or from 2.1 the transfer service). Then it checks what a pull
// cannot show: that containerd kept the layer (discard_unpacked_layers),
// that the mirrored registries' hosts.toml files still name the agent
// first, and it removes the image and its content again.
package canary

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/canary/canarystatus"
	"github.com/fleetmirror/fleetmirror/agent/hosts"
	"github.com/fleetmirror/fleetmirror/agent/metrics"
)

// Steps of a canary run, the values of Status.Step and of the result label
// of fleetmirror_canary_runs_total besides "ok".
const (
	StepHosts         = "hosts"          // writing the canary's own hosts.toml
	StepContainerd    = "containerd"     // reaching containerd
	StepPull          = "pull"           // the CRI pull through the agent
	StepRequests      = "requests"       // the agent saw the pull's requests
	StepContent       = "content"        // the layer stayed in the content store
	StepMirroredHosts = "mirrored-hosts" // the mirrored registries' hosts.toml
	StepCleanup       = "cleanup"        // removal of the image and its content
)

const (
	// DefaultInterval is how often the path is proven again, to catch
	// drift (a config edited, a file deleted) within minutes.
	DefaultInterval = 5 * time.Minute
	// runTimeout bounds a run: the image is a few KiB from loopback.
	runTimeout  = time.Minute
	dialTimeout = 5 * time.Second
	// removeTimeout bounds the removal, which outlives a cancelled run.
	removeTimeout = 15 * time.Second
	// criWait is how long a run waits for CRI to answer after containerd
	// (re)started: the content API answers before CRI is initialized.
	criWait = 15 * time.Second
)

// Status is the outcome of the last run, as GET /canary serves it; its
// JSON is defined in canarystatus, which the operator reads too.
type Status = canarystatus.Status

// Canary runs the canary pulls of one node, one at a time.
type Canary struct {
	hostsCfg   hosts.Config
	mirrorAdd  bool
	interval   time.Duration
	dial       func(ctx context.Context) (Node, error)
	configHint func() (ok bool, detail string)
	metrics    *metrics.Metrics
	log        *slog.Logger
	now        func() time.Time

	current atomic.Pointer[served] // the running image, nil between runs

	mu     sync.Mutex
	status Status
}

// Option configures New.
type Option func(*Canary)

// WithContainerd sets containerd's gRPC socket. Required.
func WithContainerd(socket string) Option {
	return func(c *Canary) { c.dial = dialContainerd(socket) }
}

// WithHosts sets the agent's hosts.toml configuration: where the canary's
// own file goes and which mirrored registries' files each run checks.
// mirrorAdd says whether the agent writes those (--containerd-mirror-add)
// or the node does, which changes the advice when one is wrong. Required.
func WithHosts(cfg hosts.Config, mirrorAdd bool) Option {
	return func(c *Canary) { c.hostsCfg, c.mirrorAdd = cfg, mirrorAdd }
}

// WithInterval sets the period between runs; DefaultInterval by default.
func WithInterval(d time.Duration) Option { return func(c *Canary) { c.interval = d } }

// WithConfigCheck sets a check of containerd's config file (the agent's
// --prep-check-config); when containerd bypasses the agent and the check
// fails, its detail is the reason, which then names the exact setting.
func WithConfigCheck(f func() (ok bool, detail string)) Option {
	return func(c *Canary) { c.configHint = f }
}

// WithMetrics records runs in m.
func WithMetrics(m *metrics.Metrics) Option { return func(c *Canary) { c.metrics = m } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(c *Canary) { c.log = l } }

// New returns a canary; Run runs it.
func New(opts ...Option) (*Canary, error) {
	c := &Canary{interval: DefaultInterval, log: slog.Default(), now: time.Now}
	for _, o := range opts {
		o(c)
	}
	if c.dial == nil {
		return nil, errors.New("canary: WithContainerd is required")
	}
	if c.hostsCfg.CertsDir == "" || len(c.hostsCfg.MirrorTargets) == 0 {
		return nil, errors.New("canary: WithHosts with a certs dir and a mirror target is required")
	}
	if c.interval <= 0 {
		return nil, fmt.Errorf("canary: interval %s: want more than 0", c.interval)
	}
	if c.metrics == nil {
		c.metrics = metrics.New(func() int { return 0 })
	}
	c.hostsCfg.Canary = Registry
	c.status = Status{Verdict: canarystatus.Pending, Interval: c.interval.String()}
	return c, nil
}

// Run runs the canary whenever trigger fires (the store's Connected: at
// start and after containerd restarted) and every interval after the last
// run, until ctx is done. Runs never overlap: this goroutine is the only
// one that runs them.
func (c *Canary) Run(ctx context.Context, trigger <-chan struct{}) {
	timer := time.NewTimer(c.interval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-trigger:
		case <-timer.C:
		}
		if ctx.Err() != nil {
			// select picks at random among ready cases: a stopping agent
			// must not write the canary's hosts.toml after cleanup ran.
			return
		}
		c.RunOnce(ctx)
		timer.Reset(c.interval)
	}
}

// RunOnce runs the canary now and returns its status. Call it only from
// one goroutine at a time (Run does).
func (c *Canary) RunOnce(ctx context.Context) Status {
	start := c.now()
	rctx, cancel := context.WithTimeout(ctx, runTimeout)
	defer cancel()
	r := c.run(rctx)
	end := c.now()
	if ctx.Err() != nil {
		// Cut short by shutdown: it says nothing about the path.
		return c.Status()
	}

	c.mu.Lock()
	prev := c.status
	st := prev
	st.LastRun = &end
	st.DurationSeconds = end.Sub(start).Seconds()
	st.Requests, st.Bytes, st.Image, st.Containerd = r.requests, r.bytes, r.image, r.version
	st.Runs++
	st.Step, st.Reason = r.step, r.reason
	st.OK = r.step == ""
	result := r.step
	if st.OK {
		st.Verdict, st.LastOK, result = canarystatus.OK, &end, canarystatus.OK
	} else {
		st.Verdict = canarystatus.Failed
	}
	c.status = st
	c.mu.Unlock()

	c.metrics.CanaryRuns.WithLabelValues(result).Inc()
	c.metrics.CanaryLastRun.Set(float64(end.Unix()))
	c.metrics.CanaryDuration.Set(st.DurationSeconds)
	if st.OK {
		c.metrics.CanaryOK.Set(1)
	} else {
		c.metrics.CanaryOK.Set(0)
	}
	switch {
	case !st.OK && (prev.OK || prev.Reason != st.Reason):
		c.log.Warn("canary failed: the mirror path is not proven",
			"step", st.Step, "reason", st.Reason, "took", end.Sub(start).String())
	case st.OK && !prev.OK:
		c.log.Info("mirror path proven: containerd pulled the canary through this agent",
			"requests", st.Requests, "bytes", st.Bytes, "took", end.Sub(start).String())
	default:
		c.log.Debug("canary", "verdict", st.Verdict, "took", end.Sub(start).String())
	}
	return st
}

// Status returns the last run's outcome.
func (c *Canary) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.status
}

// Ready is nil once the last run proved the path, and says why not
// otherwise, for the agent's readiness.
func (c *Canary) Ready() error {
	st := c.Status()
	switch st.Verdict {
	case canarystatus.OK:
		return nil
	case canarystatus.Pending:
		return errors.New("the mirror path is not proven yet: the canary pull has not run")
	}
	return fmt.Errorf("the mirror path is broken (canary step %s): %s", st.Step, st.Reason)
}

// DisabledHandler serves /canary for an agent whose canary is off, so
// readers need not tell "off" from "unreachable".
func DisabledHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(Status{Verdict: canarystatus.Disabled, Reason: "the canary is off (--canary-interval=0)"})
	})
}

// StatusHandler serves Status as JSON, for the operator and for people.
func (c *Canary) StatusHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(c.Status())
	})
}

// Wrap sends requests for the canary's registry (containerd names it in
// ?ns=) to the canary and everything else to next. They never reach the
// mirror, so the canary is never looked up on peers; and the agent keeps
// the canary's images off the peer network (it lists Registry among its
// private registries), so it is never advertised.
func (c *Canary) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Query().Get("ns") == Registry {
			c.current.Load().serve(w, req)
			return
		}
		next.ServeHTTP(w, req)
	})
}

// result is what one run found.
type result struct {
	step, reason   string
	requests       int
	bytes          int64
	image, version string
}

func (r *result) fail(step, format string, args ...any) result {
	r.step, r.reason = step, fmt.Sprintf(format, args...)
	return *r
}

func (c *Canary) run(ctx context.Context) (r result) {
	// Written each run, so a deleted one comes back; unchanged, it is
	// left alone.
	if err := hosts.WriteCanary(c.hostsCfg); err != nil {
		return r.fail(StepHosts, "writing the canary's hosts.toml under %s: %v; the agent needs write access to --certs-dir", c.hostsCfg.CertsDir, err)
	}
	n, err := c.dial(ctx)
	if err != nil {
		return r.fail(StepContainerd, "cannot reach containerd: %v", err)
	}
	defer n.Close()
	if r.version, err = n.Version(ctx); err != nil {
		return r.fail(StepContainerd, "cannot reach containerd: %v", err)
	}
	// Images a killed agent left behind; this also waits for CRI, which
	// answers later than the content API after containerd starts.
	if err := c.removeLeftovers(ctx, n); err != nil {
		return r.fail(StepContainerd, "containerd's CRI image service: %v", err)
	}

	nonce := make([]byte, 8)
	rand.Read(nonce)
	im, err := newImage(hex.EncodeToString(nonce))
	if err != nil {
		return r.fail(StepPull, "building the canary image: %v", err)
	}
	r.image = im.ref()
	s := &served{im: im}
	c.current.Store(s)
	defer c.current.Store(nil)
	// Whatever happens below, nothing of the canary stays on the node,
	// even when the agent is stopping.
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), removeTimeout)
		defer cancel()
		if err := c.remove(rctx, n, im); err != nil && r.step == "" {
			r.fail(StepCleanup, "%v", err)
		}
	}()

	return c.verify(ctx, n, im, s, r)
}

// verify checks what the canary's pull proves, step by step: containerd
// asked this agent for all of it, kept its layer, and the mirrored
// registries' hosts.toml are as written.
func (c *Canary) verify(ctx context.Context, n Node, im *image, s *served, r result) result {
	pullErr := n.Pull(ctx, im.ref())
	manifests, configs, layers, requests, bytes := s.counts()
	r.requests, r.bytes = requests, bytes
	if pullErr != nil {
		if requests == 0 {
			return r.fail(StepPull, "%s", c.bypassReason(r.version, pullErr))
		}
		return r.fail(StepPull, "containerd asked this agent for the canary (%d requests) but the pull failed: %v", requests, pullErr)
	}
	if manifests == 0 || configs == 0 || layers == 0 {
		return r.fail(StepRequests, "containerd pulled the canary but asked this agent for only part of it (manifest %d, config %d, layer %d requests): something else answers at the mirror target %s",
			manifests, configs, layers, c.hostsCfg.MirrorTargets[0])
	}
	if kept, err := layerKept(ctx, n, im); err != nil {
		return r.fail(StepContent, "%v", err)
	} else if !kept {
		return r.fail(StepContent, "containerd does not keep the canary's layer once it is unpacked: discard_unpacked_layers = true in %s of containerd's config, so this node serves its peers no layers; set it to false (`agent prep` does) and restart containerd",
			criTable(r.version, ""))
	}
	if err := hosts.Verify(c.hostsCfg, readsHostPortDirs(r.version)); err != nil {
		fix := "the agent writes these files at start (--containerd-mirror-add): restart it, and find what changed them"
		if !c.mirrorAdd {
			fix = "the node writes these files (--containerd-mirror-add=false): write them again, as `agent hosts` prints them"
		}
		return r.fail(StepMirroredHosts, "%s; %s", oneLine(err), fix)
	}
	return r
}

// gcRefPrefix starts the labels by which content keeps what it references
// from containerd's garbage collector.
const gcRefPrefix = "containerd.io/gc.ref.content."

// layerKept reports whether containerd keeps the layer: it is there, and
// the manifest references it. With discard_unpacked_layers containerd
// leaves that reference out, and its garbage collector deletes the layer
// later, whenever it next runs, so the layer's presence alone proves
// nothing right after a pull.
func layerKept(ctx context.Context, n Node, im *image) (bool, error) {
	_, found, err := n.Content(ctx, im.layer.digest)
	if err != nil || !found {
		return false, err
	}
	labels, found, err := n.Content(ctx, im.manifest.digest)
	if err != nil || !found {
		return false, err
	}
	for k, v := range labels {
		if strings.HasPrefix(k, gcRefPrefix) && v == im.layer.digest.String() {
			return true, nil
		}
	}
	return false, nil
}

// bypassReason says why containerd pulled without asking the agent.
func (c *Canary) bypassReason(version string, pullErr error) string {
	target := c.hostsCfg.MirrorTargets[0]
	if err := dialTarget(target); err != nil {
		return fmt.Sprintf("containerd cannot reach this agent at its mirror target %s (%v), so it pulls every image from upstream; --mirror-target must be where this node's agent listens (its --registry-addr), reachable from the node itself",
			target, err)
	}
	if c.configHint != nil {
		if ok, detail := c.configHint(); !ok {
			return "containerd did not ask this agent for the canary, so it pulls every image from upstream: " + detail
		}
	}
	why := fmt.Sprintf("containerd did not ask this agent for the canary, so it does not read the hosts.toml files under %s and pulls every image from upstream (containerd said: %v); set config_path = %q in %s of containerd's config (`agent prep` does) and restart containerd, or run the agent with --certs-dir set to the folder config_path names",
		c.hostsCfg.CertsDir, shortErr(pullErr), c.hostsCfg.CertsDir, criTable(version, "registry"))
	if major, minor := parseVersion(version); major > 2 || major == 2 && minor >= 1 {
		why += "; it must name that folder alone: from containerd 2.1 CRI pulls go through the transfer service, which takes a list of folders as one folder that does not exist (or set use_local_image_pull = true)"
	}
	return why
}

// remove removes the run's image, and any canary image left, through CRI,
// then whatever content of it containerd's garbage collector kept.
func (c *Canary) remove(ctx context.Context, n Node, im *image) error {
	if err := n.Remove(ctx, im.ref()); err != nil && !strings.Contains(err.Error(), "not found") {
		c.log.Debug("removing the canary image", "err", err)
	}
	if err := c.removeLeftovers(ctx, n); err != nil {
		return err
	}
	var left []string
	for _, b := range im.blobs() {
		if err := n.DeleteContent(ctx, b.digest); err != nil {
			return fmt.Errorf("the canary's content stays in containerd's content store: %v", err)
		}
		if _, has, err := n.Content(ctx, b.digest); err != nil || has {
			left = append(left, b.digest.String())
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("the canary's content stays in containerd's content store after deleting it: %s", strings.Join(left, ", "))
	}
	return nil
}

// removeLeftovers removes every canary image CRI lists.
func (c *Canary) removeLeftovers(ctx context.Context, n Node) error {
	names, err := listImages(ctx, n)
	if err != nil {
		return err
	}
	var left []string
	for _, name := range names {
		if !strings.HasPrefix(name, Registry+"/") {
			continue
		}
		if err := n.Remove(ctx, name); err != nil && !strings.Contains(err.Error(), "not found") {
			return fmt.Errorf("removing canary image %s: %w", name, err)
		}
		left = append(left, name)
	}
	if len(left) == 0 {
		return nil
	}
	if names, err = n.Images(ctx); err != nil {
		return err
	}
	for _, name := range names {
		if strings.HasPrefix(name, Registry+"/") {
			return fmt.Errorf("canary image %s is still listed after CRI RemoveImage", name)
		}
	}
	return nil
}

// listImages lists CRI's images, waiting up to criWait for CRI to answer.
func listImages(ctx context.Context, n Node) ([]string, error) {
	deadline := time.Now().Add(criWait)
	for {
		names, err := n.Images(ctx)
		if err == nil || time.Now().After(deadline) {
			return names, err
		}
		select {
		case <-ctx.Done():
			return nil, errors.Join(err, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// dialTarget checks that something listens at the mirror target.
func dialTarget(target string) error {
	u, err := url.Parse(target)
	if err != nil {
		return err
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(u.Hostname(), port), time.Second)
	if err != nil {
		return err
	}
	return conn.Close()
}

// criTable names the CRI table of containerd's config that holds key
// ("registry" or "" for the image settings) for a containerd version.
func criTable(version, key string) string {
	t := `[plugins."io.containerd.cri.v1.images"`
	if major, _ := parseVersion(version); major == 1 {
		t = `[plugins."io.containerd.grpc.v1.cri"`
		if key == "" {
			key = "containerd"
		}
	}
	if key != "" {
		t += "." + key
	}
	return t + "]"
}

// readsHostPortDirs reports whether containerd reads certs.d/host_port_
// before certs.d/host:port: from 1.7.
func readsHostPortDirs(version string) bool {
	major, minor := parseVersion(version)
	return major != 1 || minor >= 7
}

var versionRe = regexp.MustCompile(`(\d+)\.(\d+)`)

// parseVersion reads major and minor from "v2.4.2" or "1.6.20~ds1"; 0, 0
// when it cannot.
func parseVersion(v string) (major, minor int) {
	m := versionRe.FindStringSubmatch(v)
	if m == nil {
		return 0, 0
	}
	major, _ = strconv.Atoi(m[1])
	minor, _ = strconv.Atoi(m[2])
	return major, minor
}

// shortErr trims gRPC's prefix from containerd's error.
func shortErr(err error) string {
	s := err.Error()
	if _, rest, ok := strings.Cut(s, "desc = "); ok {
		s = rest
	}
	return s
}

func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }
