// Package mirrorpath reports each node's mirror path as its agent's canary
// proved it: the operator reads every agent's GET /canary (on the metrics
// port, as it reads /metrics for the hit ratio), puts the verdict on the
// node as the FleetmirrorMirrorPath condition and sums it up for the
// Spegel resource's status.mirrorPath.
package mirrorpath

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/canary/canarystatus"
)

const (
	// ConditionType is the node condition the operator writes.
	ConditionType = "FleetmirrorMirrorPath"
	// MaxFailing is how many failing nodes the Spegel status names.
	MaxFailing = 5
	// maxBody bounds what is read of one agent's answer (a verdict is
	// well under 2 KiB).
	maxBody = 64 << 10
	// maxConcurrent bounds the agents asked at once.
	maxConcurrent = 16
)

// Verdict is an agent's answer to GET /canary, defined once for agent and
// operator in canarystatus.
type Verdict = canarystatus.Status

// Agent is one agent to ask: its node and its /canary URL.
type Agent struct {
	Node, URL string
}

// Result is one node's answer, or why there is none.
type Result struct {
	Node    string
	Verdict Verdict
	Err     error
}

// Prober asks agents for their verdicts, bounded in time, size and
// concurrency.
type Prober struct {
	client *http.Client
}

// NewProber returns a prober; nil client: one with a 3 s timeout.
func NewProber(client *http.Client) *Prober {
	if client == nil {
		client = &http.Client{Timeout: 3 * time.Second}
	}
	return &Prober{client: client}
}

// Probe asks every agent, at most maxConcurrent at once, and returns the
// results sorted by node.
func (p *Prober) Probe(ctx context.Context, agents []Agent) []Result {
	out := make([]Result, len(agents))
	sem := make(chan struct{}, maxConcurrent)
	var wg sync.WaitGroup
	for i, a := range agents {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			v, err := p.get(ctx, a.URL)
			out[i] = Result{Node: a.Node, Verdict: v, Err: err}
		})
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out
}

func (p *Prober) get(ctx context.Context, url string) (Verdict, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Verdict{}, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return Verdict{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Verdict{}, fmt.Errorf("%s: %s", url, resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return Verdict{}, fmt.Errorf("%s: %w", url, err)
	}
	if len(b) > maxBody {
		return Verdict{}, fmt.Errorf("%s: answer over %d bytes", url, maxBody)
	}
	var v Verdict
	if err := json.Unmarshal(b, &v); err != nil {
		return Verdict{}, fmt.Errorf("%s: not a canary verdict: %w", url, err)
	}
	if !canarystatus.Known(v.Verdict) {
		return Verdict{}, fmt.Errorf("%s: unknown verdict %q", url, v.Verdict)
	}
	return v, nil
}

// Condition is a node condition's status, reason and message.
type Condition struct {
	Status, Reason, Message string
}

// NodeCondition turns a result into the node's condition: True when the
// canary proved the path, False with the step and the agent's reason (what
// is broken and how to fix it) when it failed, Unknown otherwise.
func NodeCondition(r Result) Condition {
	switch {
	case r.Err != nil:
		return Condition{"Unknown", "AgentUnreachable", "the operator could not read the agent's /canary: " + r.Err.Error()}
	case r.Verdict.Verdict == canarystatus.OK:
		return Condition{"True", "CanaryPulled", "containerd pulled the agent's canary image through the agent: the mirror path (config_path, hosts.toml, mirror target, content store) is proven"}
	case r.Verdict.Verdict == canarystatus.Failed:
		return Condition{"False", "CanaryFailed" + reasonWord(r.Verdict.Step), fmt.Sprintf("the canary failed at step %s: %s", r.Verdict.Step, r.Verdict.Reason)}
	case r.Verdict.Verdict == canarystatus.Disabled:
		return Condition{"Unknown", "CanaryDisabled", "the agent runs with --canary-interval=0: the mirror path is not checked"}
	default:
		return Condition{"Unknown", "CanaryPending", "the agent's first canary pull has not ended yet"}
	}
}

// reasonWord makes a step a CamelCase suffix: "mirrored-hosts" → "MirroredHosts".
func reasonWord(step string) string {
	var b []byte
	up := true
	for i := 0; i < len(step); i++ {
		c := step[i]
		switch {
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9':
			if up && c >= 'a' && c <= 'z' {
				c -= 'a' - 'A'
			}
			b = append(b, c)
			up = false
		default:
			up = true
		}
	}
	return string(b)
}

// Summary is status.mirrorPath of a Spegel resource.
type Summary struct {
	Proven, Total int
	Failing       []Failing
}

// Failing is one node whose canary failed.
type Failing struct {
	Node, Step, Reason string
}

// Summarize counts the nodes proven of all results and names the first
// MaxFailing failing ones (by node name).
func Summarize(rs []Result) Summary {
	s := Summary{Total: len(rs)}
	for _, r := range rs {
		if r.Err != nil {
			continue
		}
		switch r.Verdict.Verdict {
		case canarystatus.OK:
			s.Proven++
		case canarystatus.Failed:
			if len(s.Failing) < MaxFailing {
				s.Failing = append(s.Failing, Failing{Node: r.Node, Step: r.Verdict.Step, Reason: r.Verdict.Reason})
			}
		}
	}
	return s
}

// Status is s as the Spegel resource's status.mirrorPath.
func (s Summary) Status() map[string]any {
	f := make([]any, 0, len(s.Failing))
	for _, x := range s.Failing {
		f = append(f, map[string]any{"node": x.Node, "step": x.Step, "reason": x.Reason})
	}
	return map[string]any{"proven": int64(s.Proven), "total": int64(s.Total), "summary": fmt.Sprintf("%d/%d", s.Proven, s.Total), "failing": f}
}
