// Package metrics holds the agent's Prometheus metrics. Every gauge is either
// set where its value changes or computed at scrape time, so none goes stale.
package metrics

import (
	"net/http"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Outcomes of a mirror request, the values of the outcome label.
const (
	OutcomeLocal = "local" // served from this node's content store
	OutcomePeer  = "peer"  // proxied from a peer
	OutcomeMiss  = "miss"  // no source: containerd goes upstream
)

// What the first wave did with a blob containerd asked for and no peer
// held, the values of FirstWave's outcome label.
const (
	WaveFollowed     = "followed"      // streamed from the node that fetches it upstream
	WaveFollowFailed = "follow-failed" // that node failed before its first byte: upstream
	WaveFetched      = "fetched"       // this node fetches it upstream (for a burst, or alone)
	WaveSmall        = "small"         // under the agreement's threshold: upstream at once
)

// WaveOutcomes are FirstWave's outcome label values, all of them.
var WaveOutcomes = []string{WaveFollowed, WaveFollowFailed, WaveFetched, WaveSmall}

// Registry label values besides registry hosts.
const (
	// RegistryOther stands for every registry that has no label of its own.
	RegistryOther = "other"
	// RegistryUnknown is a request that named no registry (no ?ns=: curl,
	// skopeo, crane).
	RegistryUnknown = "unknown"
)

// MaxOpenRegistries is how many registries get a label of their own when
// the agent mirrors every registry: a node pulls from a handful, and the
// label must stay bounded whatever ?ns= values reach the registry.
const MaxOpenRegistries = 16

// Metrics are the agent's collectors, registered on their own registry so
// tests can make as many as they like.
type Metrics struct {
	Registry *prometheus.Registry
	labels   registryLabels

	Requests        *prometheus.CounterVec
	ServedToPeers   prometheus.Counter
	FetchedBytes    prometheus.Counter
	ServedBytes     *prometheus.CounterVec
	ResolveDuration *prometheus.HistogramVec
	LastSuccess     prometheus.Gauge
	AdvertisedKeys  *prometheus.GaugeVec
	PeerFailures    *prometheus.CounterVec
	Denied          *prometheus.CounterVec
	FirstWave       *prometheus.CounterVec

	CanaryOK       prometheus.Gauge
	CanaryRuns     *prometheus.CounterVec
	CanaryLastRun  prometheus.Gauge
	CanaryDuration prometheus.Gauge
}

// Option configures Metrics.
type Option func(*Metrics)

// WithRegistries names the mirrored registries (hosts, as in ?ns=): only
// they get a registry label of their own, every other value is "other".
// Without it (mirroring every registry) the first MaxOpenRegistries names
// seen get one, then "other".
func WithRegistries(hosts []string) Option {
	return func(m *Metrics) {
		for _, h := range hosts {
			m.labels.known[h] = true
		}
		m.labels.fixed = len(hosts) > 0
	}
}

// New makes and registers the agent's metrics; peers is called at scrape
// time for the connected-peers gauge. It is long because it is one list
// of declarations: every metric name, help text and label set in one place.
func New(peers func() int, opts ...Option) *Metrics {
	m := &Metrics{
		labels:   registryLabels{known: map[string]bool{}},
		Registry: prometheus.NewRegistry(),
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmirror_mirror_requests_total",
			Help: "Registry requests from containerd by upstream registry, kind (manifest, blob) and outcome (local, peer, miss).",
		}, []string{"registry", "kind", "outcome"}),
		ServedToPeers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetmirror_peer_served_bytes_total",
			Help: "Bytes this node served to peers from its content store.",
		}),
		FetchedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetmirror_peer_fetched_bytes_total",
			Help: "Bytes this node fetched from peers, verified or not.",
		}),
		ServedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmirror_mirror_served_bytes_total",
			Help: "Bytes served to this node's containerd by source (local, peer).",
		}, []string{"source"}),
		ResolveDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fleetmirror_resolve_duration_seconds",
			Help:    "Time to find the first peer holding a key, by kind (manifest, blob); misses observe the whole timeout.",
			Buckets: []float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1},
		}, []string{"kind"}),
		LastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetmirror_last_mirror_success_timestamp_seconds",
			Help: "Unix time of the last request served from a peer; 0 until the first.",
		}),
		AdvertisedKeys: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fleetmirror_advertised_keys",
			Help: "Keys this node advertises, by type (tag, digest).",
		}, []string{"type"}),
		PeerFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmirror_peer_failures_total",
			Help: "Failed fetches from peers by reason (connect, status, short, digest, auth).",
		}, []string{"reason"}),
		FirstWave: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmirror_first_wave_blobs_total",
			Help: "Blobs no peer held when containerd asked, by what the first wave did: followed (streamed from the node that fetches it), follow-failed (that node failed before its first byte; upstream), fetched (this node fetched it upstream), small (upstream without agreeing). Nothing with --burst-settle=0.",
		}, []string{"outcome"}),
		Denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmirror_registry_denied_total",
			Help: "Registry requests refused with 403 by reason (stranger: neither this node nor a member; old-agent: a peer without membership; bad-proof).",
		}, []string{"reason"}),
		CanaryOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetmirror_canary_ok",
			Help: "1 when the last canary pull proved that containerd pulls through this node's agent, 0 when it failed or none has run yet.",
		}),
		CanaryRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetmirror_canary_runs_total",
			Help: "Canary pulls by result: ok, or the step that failed (hosts, pull, requests, content, mirrored-hosts, cleanup).",
		}, []string{"result"}),
		CanaryLastRun: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetmirror_canary_last_run_timestamp_seconds",
			Help: "Unix time the last canary pull ended; 0 until the first.",
		}),
		CanaryDuration: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetmirror_canary_duration_seconds",
			Help: "How long the last canary took, pull, checks and removal.",
		}),
	}
	m.Registry.MustRegister(m.CanaryOK, m.CanaryRuns, m.CanaryLastRun, m.CanaryDuration,
		m.Requests, m.ServedToPeers, m.FetchedBytes, m.ServedBytes,
		m.ResolveDuration, m.LastSuccess, m.AdvertisedKeys, m.PeerFailures, m.Denied, m.FirstWave,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fleetmirror_peers",
			Help: "Peers this node is connected to now.",
		}, func() float64 { return float64(peers()) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	// Every outcome from the start, so that a rate over the first burst
	// does not miss its first count.
	for _, o := range WaveOutcomes {
		m.FirstWave.WithLabelValues(o)
	}
	for _, o := range opts {
		o(m)
	}
	return m
}

// RegistryLabel is the registry label for a request that named registry
// ns: every ?ns= value would otherwise be a new series, and anyone who
// reaches the registry port could grow the agent's memory without bound.
func (m *Metrics) RegistryLabel(ns string) string {
	if ns == "" {
		return RegistryUnknown
	}
	return m.labels.label(ns)
}

// registryLabels is the bounded set of registries with a label of their own.
type registryLabels struct {
	mu    sync.Mutex
	known map[string]bool
	fixed bool // the configured registries; no more are admitted
}

func (l *registryLabels) label(ns string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.known[ns] {
		return ns
	}
	if l.fixed || len(l.known) >= MaxOpenRegistries {
		return RegistryOther
	}
	l.known[ns] = true
	return ns
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}
