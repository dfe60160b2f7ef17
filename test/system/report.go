package system

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"
)

// String is the report as the demo prints it and the notes quote it.
func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Workload: %s\n", r.Workload)
	if r.PeerHits != "" {
		fmt.Fprintf(&b, "Peer hit ratio (status.peerHits) after the update: %s\n", r.PeerHits)
	}
	fmt.Fprintf(&b, "\nWall times:\n")
	for _, s := range r.Steps {
		fmt.Fprintf(&b, "  %-40s %8.1fs\n", s, r.Timings[s].Seconds())
	}
	if len(r.Latencies) > 0 {
		fmt.Fprintf(&b, "\nMirror path proof:\n")
		for _, l := range r.Latencies {
			fmt.Fprintf(&b, "  %s\n", l)
		}
	}
	for _, phase := range []string{"rollout", "agent-pod-deleted", "fresh-node", "baseline"} {
		ps := r.PullsOf(phase)
		if len(ps) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\nPulls, %s:\n", phaseTitle[phase])
		for _, p := range ps {
			fmt.Fprintf(&b, "  %d. %-3s %7.2fs  upstream %9s  peers %9s\n", p.Order, p.Node, p.Took.Seconds(), mb(p.UpstreamBlobBytes), mb(p.PeerBytes))
		}
	}
	if len(r.MemorySeen) > 0 {
		fmt.Fprintf(&b, "\nCluster memory (RSS of the control plane, kubelets, containerds, shims, pods):\n")
		for i, when := range r.MemorySeen {
			fmt.Fprintf(&b, "  %-40s %6d MiB\n", when, r.Memory[when]>>20)
			if i < len(r.MemoryByCommand) {
				fmt.Fprintf(&b, "    MiB by process: %s\n", r.MemoryByCommand[i])
			}
		}
	}
	return b.String()
}

var phaseTitle = map[string]string{
	"rollout":           "rollout with the addon (first node, then the rest at once)",
	"agent-pod-deleted": "update with an agent pod deleted mid-rollout",
	"fresh-node":        "fresh node, upstream stopped",
	"baseline":          "the same rollout without the addon",
}

// MeanLater is the mean pull time of a phase's pulls after the first.
func (r *Report) MeanLater(phase string) time.Duration {
	ps := r.PullsOf(phase)
	if len(ps) < 2 {
		return 0
	}
	var sum time.Duration
	for _, p := range ps[1:] {
		sum += p.Took
	}
	return sum / time.Duration(len(ps)-1)
}

func (s *scenario) measureMemory(ctx context.Context, when string) {
	byCmd, procs, err := s.c.MemoryByCommand(ctx)
	if err != nil {
		s.say("  (memory not measured: %v)", err)
		return
	}
	cmds := slices.Collect(maps.Keys(byCmd))
	sort.Slice(cmds, func(i, j int) bool { return byCmd[cmds[i]] > byCmd[cmds[j]] })
	var rss int64
	var parts []string
	for _, cmd := range cmds {
		rss += byCmd[cmd]
		parts = append(parts, fmt.Sprintf("%s %d", cmd, byCmd[cmd]>>20))
	}
	s.rep.Memory[when] = rss
	s.rep.MemoryByCommand = append(s.rep.MemoryByCommand, strings.Join(parts, ", "))
	s.rep.MemorySeen = append(s.rep.MemorySeen, when)
	s.say("  cluster memory (%s): %d MiB RSS in %d processes (MiB: %s)", when, rss>>20, procs, strings.Join(parts, ", "))
}
