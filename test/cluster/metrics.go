package cluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
)

// Sample is one line of the Prometheus text format.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// Samples is one scrape of an agent.
type Samples []Sample

// Sum adds up the samples of metric name whose labels include every given
// name/value pair: Sum("fleetmirror_mirror_served_bytes_total", "source", "peer").
func (m Samples) Sum(name string, labelPairs ...string) float64 {
	var s float64
next:
	for _, x := range m {
		if x.Name != name {
			continue
		}
		for i := 0; i+1 < len(labelPairs); i += 2 {
			if x.Labels[labelPairs[i]] != labelPairs[i+1] {
				continue next
			}
		}
		s += x.Value
	}
	return s
}

// FirstWave sums what the first wave did with blobs on the nodes' agents
// so far (fleetmirror_first_wave_blobs_total), by outcome.
func FirstWave(ctx context.Context, nodes []*Node) (map[string]float64, error) {
	out := map[string]float64{}
	for _, n := range nodes {
		s, err := n.Metrics(ctx)
		if err != nil {
			return nil, err
		}
		for _, o := range metrics.WaveOutcomes {
			out[o] += s.Sum("fleetmirror_first_wave_blobs_total", "outcome", o)
		}
	}
	return out, nil
}

// Metrics scrapes the node's agent.
func (n *Node) Metrics(ctx context.Context) (Samples, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.MetricsURL(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: scrape metrics: %w", n.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: scrape %s: %s", n.Name, n.MetricsURL(), resp.Status)
	}
	m, err := ParseMetrics(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", n.Name, err)
	}
	return m, nil
}

// ParseMetrics reads the Prometheus text exposition format (comments and
// timestamps ignored).
func ParseMetrics(r io.Reader) (Samples, error) {
	var m Samples
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || s[0] == '#' {
			continue
		}
		x, err := parseSample(s)
		if err != nil {
			return nil, fmt.Errorf("metrics line %d %q: %w", line, s, err)
		}
		m = append(m, x)
	}
	return m, sc.Err()
}

func parseSample(s string) (Sample, error) {
	x := Sample{Labels: map[string]string{}}
	i := strings.IndexAny(s, "{ \t")
	if i < 0 {
		return x, fmt.Errorf("no value")
	}
	x.Name, s = s[:i], s[i:]
	if s[0] == '{' {
		s = s[1:]
		for {
			s = strings.TrimLeft(s, " ,")
			if strings.HasPrefix(s, "}") {
				s = s[1:]
				break
			}
			eq := strings.IndexByte(s, '=')
			if eq < 0 || len(s) < eq+2 || s[eq+1] != '"' {
				return x, fmt.Errorf("bad label")
			}
			key := strings.TrimSpace(s[:eq])
			s = s[eq+2:]
			var val strings.Builder
			j := 0
			for ; j < len(s) && s[j] != '"'; j++ {
				if s[j] == '\\' && j+1 < len(s) {
					j++
					switch s[j] {
					case 'n':
						val.WriteByte('\n')
					default:
						val.WriteByte(s[j])
					}
					continue
				}
				val.WriteByte(s[j])
			}
			if j >= len(s) {
				return x, fmt.Errorf("unterminated label value")
			}
			x.Labels[key] = val.String()
			s = s[j+1:]
		}
	}
	f := strings.Fields(s)
	if len(f) == 0 {
		return x, fmt.Errorf("no value")
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return x, err
	}
	x.Value = v
	return x, nil
}

// TimeGet GETs url, reads the whole body and returns how long that took and
// the status code (0 when the request failed).
func TimeGet(ctx context.Context, url string) (time.Duration, int) {
	return TimeGetWith(ctx, http.DefaultClient, url)
}

// TimeGetWith is TimeGet with client.
func TimeGetWith(ctx context.Context, client *http.Client, url string) (time.Duration, int) {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, 0
	}
	resp, err := client.Do(req)
	if err != nil {
		return time.Since(start), 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return time.Since(start), resp.StatusCode
}
