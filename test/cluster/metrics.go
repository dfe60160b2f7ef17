package cluster

import (
	"context"
	"fmt"
	"net/http"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metrics scrapes the node's agent and returns every sample, keyed by the
// metric name; labels are matched by Sum.
func (n *Node) Metrics(ctx context.Context) (Samples, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.MetricsURL(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scraping %s: %w", n.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scraping %s: %s", n.Name, resp.Status)
	}
	dec := expfmt.NewDecoder(resp.Body, expfmt.NewFormat(expfmt.TypeTextPlain))
	s := Samples{}
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); err != nil {
			break
		}
		vec, err := expfmt.ExtractSamples(&expfmt.DecodeOptions{Timestamp: model.Now()}, &mf)
		if err != nil {
			return nil, err
		}
		for _, smp := range vec {
			name := string(smp.Metric[model.MetricNameLabel])
			s[name] = append(s[name], smp)
		}
	}
	return s, nil
}

// Samples are scraped metrics by name.
type Samples map[string]model.Vector

// Sum adds the samples of name whose labels include the given pairs
// ("outcome", "peer", ...).
func (s Samples) Sum(name string, labels ...string) float64 {
	var total float64
next:
	for _, smp := range s[name] {
		for i := 0; i+1 < len(labels); i += 2 {
			if string(smp.Metric[model.LabelName(labels[i])]) != labels[i+1] {
				continue next
			}
		}
		total += float64(smp.Value)
	}
	return total
}
