package web

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/oci"
)

// Stats is what the page shows, and what GET /debug/web/stats returns.
type Stats struct {
	Version string    `json:"version"`
	Now     time.Time `json:"now"`

	// LastMirrorSuccess is how long ago a request was last served from a
	// peer, like "2m30s", or "Pending" before the first.
	LastMirrorSuccess   string     `json:"lastMirrorSuccess"`
	LastMirrorSuccessAt *time.Time `json:"lastMirrorSuccessAt,omitempty"`

	Peers      []Peer     `json:"peers"`
	Advertised Advertised `json:"advertised"`
	Requests   Requests   `json:"requests"`
	Bytes      Bytes      `json:"bytes"`
	Config     ConfigView `json:"config"`
	Prep       Prep       `json:"prep"`
	Canary     Canary     `json:"canary"`
	// Error is set when the metrics could not be read; the rest still is.
	Error string `json:"error,omitempty"`
}

// Peer is a connected peer.
type Peer struct {
	ID      string `json:"id"`
	Address string `json:"address"` // its registry, IP:port
}

// Advertised is what this node holds and announces to its peers.
type Advertised struct {
	Images  int      `json:"images"`  // distinct registry/repository names
	Tags    int      `json:"tags"`    // tag keys
	Digests int      `json:"digests"` // manifests, configs and layers
	TagKeys []string `json:"tagKeys"` // sorted, at most maxTagKeys
	// More counts the tags not listed.
	More int `json:"more"`
}

// Requests are the requests to this node's mirror since start: containerd's,
// and Measure Image Pull's, which go the same way.
type Requests struct {
	Local int64 `json:"local"` // served from this node's content store
	Peer  int64 `json:"peer"`  // served from a peer
	Miss  int64 `json:"miss"`  // no source: containerd went upstream
	// PeerHitRatio is peer / (peer + miss): of what this node lacked, the
	// share its peers served. -1 before any such request.
	PeerHitRatio float64 `json:"peerHitRatio"`
	PeerFailures int64   `json:"peerFailures"`
}

// Bytes served to this node's containerd by source. Every byte from a peer
// is a byte the upstream did not have to send; the agent does not see what
// containerd fetched upstream after a miss.
type Bytes struct {
	FromPeers     int64 `json:"fromPeers"`
	FromLocal     int64 `json:"fromLocal"`
	ServedToPeers int64 `json:"servedToPeers"`
	// UpstreamSaved is the upstream-equivalent of the bytes from peers:
	// what the upstream registry would have sent without the mirror.
	UpstreamSaved int64 `json:"upstreamSaved"`
}

// ConfigView is the configuration as shown.
type ConfigView struct {
	MirroredRegistries []string `json:"mirroredRegistries"`
	MirrorTargets      []string `json:"mirrorTargets"`
	ResolveTimeout     string   `json:"resolveTimeout"`
	ResolveRetries     int      `json:"resolveRetries"`
	RegistryURL        string   `json:"registryURL"`
}

// Prep is the node's containerd-prep check.
type Prep struct {
	Configured bool   `json:"configured"`
	OK         bool   `json:"ok"`
	Detail     string `json:"detail"`
}

// Canary is the node's last canary pull, the proof of its mirror path.
type Canary struct {
	State  string `json:"state"` // ok, failed, pending or disabled
	Detail string `json:"detail"`
}

// maxTagKeys bounds the tag list so a node with thousands of images still
// gets a small page.
const maxTagKeys = 200

// Pending is shown as Last Mirror Success until a peer first serves.
const Pending = "Pending"

// Stats reads the node's state now: metrics from the registry's collectors,
// peers from the router, keys from the store.
func (w *Web) Stats(ctx context.Context) Stats {
	now := w.now()
	s := Stats{
		Version:           w.cfg.Version,
		Now:               now.UTC().Truncate(time.Second),
		LastMirrorSuccess: Pending,
		Peers:             []Peer{},
		Advertised:        w.advertised(),
		Config: ConfigView{
			MirroredRegistries: w.cfg.MirroredRegistries,
			MirrorTargets:      w.cfg.MirrorTargets,
			ResolveTimeout:     w.cfg.ResolveTimeout.String(),
			ResolveRetries:     w.cfg.ResolveRetries,
			RegistryURL:        w.cfg.RegistryURL,
		},
		Prep:   Prep{Detail: "not configured"},
		Canary: Canary{State: "disabled", Detail: "disabled (--canary-interval=0)"},
	}
	for _, p := range w.router.Peers() {
		s.Peers = append(s.Peers, Peer{ID: p.ID, Address: p.Address})
	}
	if s.Config.MirroredRegistries == nil {
		s.Config.MirroredRegistries = []string{}
	}
	if w.canary != nil {
		s.Canary.State, s.Canary.Detail = w.canary()
	}
	if w.prep != nil {
		s.Prep.Configured = true
		s.Prep.OK, s.Prep.Detail = w.prep()
	}
	fams, err := w.gatherer.Gather()
	if err != nil {
		// Gather returns what it could read along with the error.
		s.Error = "reading metrics: " + err.Error()
	}
	m := families(fams)
	if ts := m.sum("fleetmirror_last_mirror_success_timestamp_seconds"); ts > 0 {
		at := time.Unix(int64(ts), 0).UTC()
		s.LastMirrorSuccessAt = &at
		s.LastMirrorSuccess = Ago(now, at)
	}
	s.Requests = Requests{
		Local:        int64(m.sum("fleetmirror_mirror_requests_total", "outcome", metrics.OutcomeLocal)),
		Peer:         int64(m.sum("fleetmirror_mirror_requests_total", "outcome", metrics.OutcomePeer)),
		Miss:         int64(m.sum("fleetmirror_mirror_requests_total", "outcome", metrics.OutcomeMiss)),
		PeerFailures: int64(m.sum("fleetmirror_peer_failures_total")),
		PeerHitRatio: -1,
	}
	if n := s.Requests.Peer + s.Requests.Miss; n > 0 {
		s.Requests.PeerHitRatio = float64(s.Requests.Peer) / float64(n)
	}
	s.Bytes = Bytes{
		FromPeers:     int64(m.sum("fleetmirror_mirror_served_bytes_total", "source", metrics.OutcomePeer)),
		FromLocal:     int64(m.sum("fleetmirror_mirror_served_bytes_total", "source", metrics.OutcomeLocal)),
		ServedToPeers: int64(m.sum("fleetmirror_peer_served_bytes_total")),
	}
	s.Bytes.UpstreamSaved = s.Bytes.FromPeers
	return s
}

// Ago formats how long before now t was, to the second: "2m30s", "0s".
func Ago(now, t time.Time) string {
	d := now.Sub(t).Round(time.Second)
	if d < 0 {
		d = 0
	}
	return d.String()
}

func (w *Web) advertised() Advertised {
	a := Advertised{TagKeys: []string{}}
	images := map[string]bool{}
	var tags []string
	for _, k := range w.store.Keys() {
		if oci.IsDigestKey(k) {
			a.Digests++
			continue
		}
		// Only tags of mirrored registries are advertised; digests always are.
		if len(w.cfg.MirroredRegistries) > 0 && !slices.Contains(w.cfg.MirroredRegistries, oci.RegistryOfKey(k)) {
			continue
		}
		tags = append(tags, k)
		images[imageName(k)] = true
	}
	slices.Sort(tags)
	a.Tags, a.Images = len(tags), len(images)
	if len(tags) > maxTagKeys {
		a.More = len(tags) - maxTagKeys
		tags = tags[:maxTagKeys]
	}
	a.TagKeys = append(a.TagKeys, tags...)
	return a
}

// imageName is a tag key without its tag: "10.0.0.5:5000/app:v1" -> "10.0.0.5:5000/app".
func imageName(tagKey string) string {
	if i := strings.LastIndex(tagKey, ":"); i > strings.LastIndex(tagKey, "/") {
		return tagKey[:i]
	}
	return tagKey
}

// metricSet is a gathered registry, indexed by metric name.
type metricSet map[string]*dto.MetricFamily

func families(fams []*dto.MetricFamily) metricSet {
	m := metricSet{}
	for _, f := range fams {
		m[f.GetName()] = f
	}
	return m
}

// sum adds the values of a counter or gauge over the series whose labels
// match every name/value pair given.
func (m metricSet) sum(name string, labelPairs ...string) float64 {
	f, ok := m[name]
	if !ok {
		return 0
	}
	var total float64
next:
	for _, x := range f.GetMetric() {
		for i := 0; i+1 < len(labelPairs); i += 2 {
			if labelValue(x, labelPairs[i]) != labelPairs[i+1] {
				continue next
			}
		}
		switch {
		case x.Counter != nil:
			total += x.Counter.GetValue()
		case x.Gauge != nil:
			total += x.Gauge.GetValue()
		case x.Untyped != nil:
			total += x.Untyped.GetValue()
		}
	}
	return total
}

func labelValue(x *dto.Metric, name string) string {
	for _, l := range x.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// formatBytes prints a byte count for people: "1.5 MB".
func formatBytes(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit && exp < 4; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTP"[exp])
}

// percent prints a ratio for people; negative means none yet.
func percent(r float64) string {
	if r < 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", r*100)
}
