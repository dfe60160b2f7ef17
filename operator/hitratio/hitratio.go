// Package hitratio tells the cluster's peer hit ratio over a recent window
// from the agents' own counters: of the requests containerd sent its agent,
// how many peers answered rather than the upstream.
package hitratio

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

const requestsMetric = "fleetmirror_mirror_requests_total"

// Sampler scrapes agents and keeps cluster totals that only grow, so an
// agent that restarts (its counters back at zero) does not skew the window.
type Sampler struct {
	client *http.Client
	window time.Duration
	now    func() time.Time

	mu      sync.Mutex
	last    map[string]counts // per agent URL, as last scraped
	total   counts            // increases summed over all agents
	history []sample
}

type counts struct{ peer, miss float64 }

type sample struct {
	at    time.Time
	total counts
}

// Ratio is the hit ratio of a window.
type Ratio struct {
	// Value is peer / (peer + miss); meaningful only when Requests > 0.
	Value float64
	// Requests that peers or the upstream answered in the window.
	Requests float64
	// Window is the time the ratio covers: from the newest sample at least
	// a window old (or the first sample) until now.
	Window time.Duration
	// Reached and Total count the agents scraped.
	Reached, Total int
}

// New returns a sampler whose ratio covers the last window.
func New(window time.Duration, client *http.Client) *Sampler {
	if client == nil {
		client = &http.Client{Timeout: 3 * time.Second}
	}
	return &Sampler{client: client, window: window, now: time.Now, last: map[string]counts{}}
}

// Observe scrapes every agent's metrics URL and returns the ratio over the
// window. Agents that cannot be reached are skipped and counted; an error
// is returned only when none could be.
func (s *Sampler) Observe(ctx context.Context, urls []string) (Ratio, error) {
	type result struct {
		url string
		c   counts
		err error
	}
	results := make([]result, len(urls))
	var wg sync.WaitGroup
	for i, u := range urls {
		wg.Go(func() {
			c, err := s.scrape(ctx, u)
			results[i] = result{u, c, err}
		})
	}
	wg.Wait()

	s.mu.Lock()
	defer s.mu.Unlock()
	r := Ratio{Total: len(urls)}
	var errs []error
	for _, res := range results {
		if res.err != nil {
			errs = append(errs, res.err)
			continue
		}
		r.Reached++
		prev, seen := s.last[res.url]
		s.total.peer += increase(prev.peer, res.c.peer, seen)
		s.total.miss += increase(prev.miss, res.c.miss, seen)
		s.last[res.url] = res.c
	}
	if r.Reached == 0 && len(urls) > 0 {
		return r, fmt.Errorf("no agent's metrics could be read: %w", errors.Join(errs...))
	}
	now := s.now()
	s.history = append(s.history, sample{at: now, total: s.total})
	for len(s.history) > 1 && now.Sub(s.history[1].at) >= s.window {
		s.history = s.history[1:]
	}
	first := s.history[0]
	peer, miss := s.total.peer-first.total.peer, s.total.miss-first.total.miss
	r.Requests, r.Window = peer+miss, now.Sub(first.at)
	if r.Requests > 0 {
		r.Value = peer / r.Requests
	}
	return r, nil
}

// increase is how much a counter grew since the last scrape; a counter
// that went down was reset by a restart, so all of it is new.
func increase(prev, cur float64, seen bool) float64 {
	switch {
	case !seen:
		return 0 // the first scrape sets the baseline
	case cur < prev:
		return cur
	default:
		return cur - prev
	}
}

func (s *Sampler) scrape(ctx context.Context, url string) (counts, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return counts{}, err
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return counts{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return counts{}, fmt.Errorf("%s: %s", url, resp.Status)
	}
	dec := expfmt.NewDecoder(resp.Body, expfmt.NewFormat(expfmt.TypeTextPlain))
	var c counts
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return counts{}, fmt.Errorf("%s: reading metrics: %w", url, err)
		}
		if mf.GetName() != requestsMetric {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() != "outcome" {
					continue
				}
				switch l.GetValue() {
				case "peer":
					c.peer += m.GetCounter().GetValue()
				case "miss":
					c.miss += m.GetCounter().GetValue()
				}
			}
		}
	}
	return c, nil
}
