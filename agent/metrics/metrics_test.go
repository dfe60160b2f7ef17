package metrics

import (
	"encoding/json"
	"io"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
)

// scrape returns what /metrics serves with every labelled series present,
// so the lint sees every metric the agent can expose.
func scrape(t *testing.T) string {
	t.Helper()
	m := New(func() int { return 2 })
	for _, o := range []string{OutcomeLocal, OutcomePeer, OutcomeMiss} {
		m.Requests.WithLabelValues("docker.io", "blob", o).Inc()
	}
	m.ServedBytes.WithLabelValues(OutcomeLocal).Add(1)
	m.ServedBytes.WithLabelValues(OutcomePeer).Add(1)
	m.ResolveDuration.WithLabelValues("blob").Observe(0.001)
	m.AdvertisedKeys.WithLabelValues("tag").Set(1)
	m.PeerFailures.WithLabelValues("digest").Inc()
	m.CanaryRuns.WithLabelValues("ok").Inc()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return string(body)
}

// TestPromlint holds the metric names and help texts to Prometheus
// conventions: base units in names, _total on counters, help on every metric.
// The same lint runs over a live agent's /metrics in test/e2e.
func TestPromlint(t *testing.T) {
	body := scrape(t)
	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("metric %s: %s", p.Metric, p.Text)
	}
	for _, name := range []string{"fleetmirror_mirror_requests_total", "fleetmirror_peers", "fleetmirror_resolve_duration_seconds_bucket"} {
		if !strings.Contains(body, name) {
			t.Errorf("/metrics lacks %s", name)
		}
	}
}

// TestPromlintCatches makes sure the lint above can fail.
func TestPromlintCatches(t *testing.T) {
	bad := "# HELP fleetmirror_bytes_fetched bytes\n# TYPE fleetmirror_bytes_fetched counter\nfleetmirror_bytes_fetched 1\n"
	problems, err := promlint.New(strings.NewReader(bad)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) == 0 {
		t.Fatal("promlint accepted a counter without _total")
	}
}

var metricRe = regexp.MustCompile(`\bfleetmirror_[a-z_]+`)

// TestDashboardUsesRealMetrics keeps the chart's Grafana dashboard in step
// with the metrics: every fleetmirror_ name a panel queries must exist.
func TestDashboardUsesRealMetrics(t *testing.T) {
	raw, err := os.ReadFile("../../helm-charts/spegel/dashboards/fleetmirror.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard is not valid JSON: %v", err)
	}
	if dash.Title == "" || dash.UID == "" || len(dash.Panels) == 0 {
		t.Fatalf("dashboard needs a title, a uid and panels")
	}
	body := scrape(t)
	exposed := map[string]bool{}
	for _, name := range metricRe.FindAllString(body, -1) {
		exposed[name] = true
	}
	queried := map[string]bool{}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, name := range metricRe.FindAllString(tg.Expr, -1) {
				queried[name] = true
				if !exposed[name] {
					t.Errorf("panel %q queries %s, which the agent does not expose", p.Title, name)
				}
			}
		}
	}
	// What the issue asks the dashboard to show.
	for _, name := range []string{"fleetmirror_mirror_requests_total", "fleetmirror_mirror_served_bytes_total",
		"fleetmirror_resolve_duration_seconds_bucket", "fleetmirror_last_mirror_success_timestamp_seconds"} {
		if !queried[name] {
			t.Errorf("no panel shows %s", name)
		}
	}
}
