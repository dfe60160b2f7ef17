// Package canarystatus is what an agent's GET /canary answers: the one
// definition of that JSON, shared by the agent (agent/canary) and the
// operator (operator/mirrorpath). It imports nothing beyond the standard
// library, so the operator reads it without linking the containerd client.
// Agents and operators of adjacent versions meet during upgrades: fields
// are only ever added, and TestWireNames pins the names of those there are.
package canarystatus

import (
	"fmt"
	"time"
)

// Verdicts of Status.Verdict.
const (
	Pending  = "pending" // no run has ended yet
	OK       = "ok"
	Failed   = "failed"
	Disabled = "disabled" // the agent runs with --canary-interval=0
)

// Known reports whether v is a verdict this version knows.
func Known(v string) bool {
	switch v {
	case Pending, OK, Failed, Disabled:
		return true
	}
	return false
}

// Status is the outcome of the agent's last canary run.
type Status struct {
	// Verdict is pending, ok, failed or disabled; OK is Verdict == ok.
	Verdict string `json:"verdict"`
	OK      bool   `json:"ok"`
	// Step is the step that failed; empty unless failed.
	Step string `json:"step,omitempty"`
	// Reason says what is broken and how to fix it; empty unless failed.
	Reason string `json:"reason,omitempty"`
	// LastRun is when the last run ended; LastOK when one last proved the path.
	LastRun *time.Time `json:"lastRun,omitempty"`
	LastOK  *time.Time `json:"lastOK,omitempty"`
	// What the last run cost: its wall time, and the requests and bytes
	// containerd sent the agent for it (nothing goes anywhere else).
	DurationSeconds float64 `json:"durationSeconds"`
	Requests        int     `json:"requests"`
	Bytes           int64   `json:"bytes"`
	Image           string  `json:"image,omitempty"`
	// Containerd is the version the last run talked to.
	Containerd string `json:"containerd,omitempty"`
	// Interval is the period between runs.
	Interval string `json:"interval"`
	Runs     int64  `json:"runs"`
}

// Summary is the status in one line, for the debug page.
func (s Status) Summary() string {
	switch s.Verdict {
	case Pending:
		return "not proven yet: the canary pull has not run"
	case Disabled:
		return "off (--canary-interval=0): the mirror path is not checked"
	case OK:
		return fmt.Sprintf("containerd pulled the canary through this agent at %s (%d requests, %d bytes, %.0fms); every %s",
			s.LastRun.UTC().Format(time.RFC3339), s.Requests, s.Bytes, s.DurationSeconds*1000, s.Interval)
	}
	return fmt.Sprintf("canary step %s failed at %s: %s", s.Step, s.LastRun.UTC().Format(time.RFC3339), s.Reason)
}
