package hitratio

import (
	"context"
	"math"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
)

// agent serves a real agent metrics registry over HTTP.
type agent struct {
	m   *metrics.Metrics
	srv *httptest.Server
}

func newAgent(t *testing.T) *agent {
	a := &agent{m: metrics.New(func() int { return 0 })}
	a.srv = httptest.NewServer(a.m.Handler())
	t.Cleanup(a.srv.Close)
	return a
}

func (a *agent) add(outcome string, n float64) {
	a.m.Requests.WithLabelValues("docker.io", "blob", outcome).Add(n)
}

func TestRatioOverWindow(t *testing.T) {
	a, b := newAgent(t), newAgent(t)
	s := New(10*time.Minute, nil)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s.now = func() time.Time { return now }
	urls := []string{a.srv.URL, b.srv.URL}
	ctx := context.Background()

	a.add(metrics.OutcomePeer, 100) // before the first scrape: the baseline, not counted
	r, err := s.Observe(ctx, urls)
	if err != nil || r.Requests != 0 || r.Reached != 2 {
		t.Fatalf("first observation %+v, %v", r, err)
	}

	now = now.Add(time.Minute)
	a.add(metrics.OutcomePeer, 6)
	b.add(metrics.OutcomePeer, 3)
	b.add(metrics.OutcomeMiss, 1)
	b.add(metrics.OutcomeLocal, 50) // local hits are neither
	if r, _ = s.Observe(ctx, urls); r.Requests != 10 || math.Abs(r.Value-0.9) > 1e-9 || r.Window != time.Minute {
		t.Fatalf("got %+v, want 9 of 10 over 1m", r)
	}

	// Agent b restarts: its counters start again from zero. As in
	// Prometheus, a reset shows as a counter going down.
	b2 := newAgent(t)
	b2.add(metrics.OutcomePeer, 2)
	urls[1] = b.srv.URL
	b.m = b2.m
	b.srv.Config.Handler = b2.m.Handler()
	now = now.Add(time.Minute)
	if r, _ = s.Observe(ctx, urls); r.Requests != 12 || math.Abs(r.Value-11.0/12) > 1e-9 {
		t.Fatalf("after a restart got %+v, want 11 of 12", r)
	}

	// Past the window only the newest requests count.
	now = now.Add(20 * time.Minute)
	a.add(metrics.OutcomePeer, 4)
	if r, _ = s.Observe(ctx, urls); r.Requests != 4 || r.Value != 1 {
		t.Fatalf("after the window got %+v, want 4 of 4", r)
	}
}

func TestUnreachableAgents(t *testing.T) {
	a := newAgent(t)
	dead := httptest.NewServer(nil)
	dead.Close()
	s := New(time.Minute, nil)
	r, err := s.Observe(context.Background(), []string{a.srv.URL, dead.URL})
	if err != nil || r.Reached != 1 || r.Total != 2 {
		t.Fatalf("got %+v, %v", r, err)
	}
	if _, err := s.Observe(context.Background(), []string{dead.URL}); err == nil {
		t.Fatal("no error when no agent answers")
	}
}
