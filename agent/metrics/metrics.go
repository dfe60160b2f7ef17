// Package metrics holds the agent's Prometheus metrics. Every gauge is either
// set where its value changes or computed at scrape time, so none goes stale.
package metrics

import (
	"net/http"

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

// Metrics are the agent's collectors, registered on their own registry so
// tests can make as many as they like.
type Metrics struct {
	Registry *prometheus.Registry

	Requests        *prometheus.CounterVec
	ServedToPeers   prometheus.Counter
	FetchedBytes    prometheus.Counter
	ServedBytes     *prometheus.CounterVec
	ResolveDuration *prometheus.HistogramVec
	LastSuccess     prometheus.Gauge
	AdvertisedKeys  *prometheus.GaugeVec
	PeerFailures    *prometheus.CounterVec
	Denied          *prometheus.CounterVec

	CanaryOK       prometheus.Gauge
	CanaryRuns     *prometheus.CounterVec
	CanaryLastRun  prometheus.Gauge
	CanaryDuration prometheus.Gauge
}

// New makes and registers the agent's metrics; peers is called at scrape
// time for the connected-peers gauge.
func New(peers func() int) *Metrics {
	m := &Metrics{
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
		m.ResolveDuration, m.LastSuccess, m.AdvertisedKeys, m.PeerFailures, m.Denied,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fleetmirror_peers",
			Help: "Peers this node is connected to now.",
		}, func() float64 { return float64(peers()) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}
