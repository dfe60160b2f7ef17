package mirrorpath

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestNodeCondition(t *testing.T) {
	for _, tt := range []struct {
		r                    Result
		status, reason, text string
	}{
		{Result{Verdict: Verdict{Verdict: "ok", OK: true}}, "True", "CanaryPulled", "proven"},
		{Result{Verdict: Verdict{Verdict: "failed", Step: "mirrored-hosts", Reason: "hosts.toml for docker.io is missing; write it"}}, "False", "CanaryFailedMirroredHosts", "step mirrored-hosts: hosts.toml for docker.io is missing; write it"},
		{Result{Verdict: Verdict{Verdict: "pending"}}, "Unknown", "CanaryPending", ""},
		{Result{Verdict: Verdict{Verdict: "disabled"}}, "Unknown", "CanaryDisabled", "--canary-interval=0"},
		{Result{Err: errors.New("dial tcp: refused")}, "Unknown", "AgentUnreachable", "refused"},
	} {
		c := NodeCondition(tt.r)
		if c.Status != tt.status || c.Reason != tt.reason || !strings.Contains(c.Message, tt.text) {
			t.Errorf("%+v: %+v", tt.r, c)
		}
	}
}

func TestSummarize(t *testing.T) {
	var rs []Result
	for i := range 8 {
		rs = append(rs, Result{Node: fmt.Sprintf("n%d", i), Verdict: Verdict{Verdict: "failed", Step: "pull", Reason: "r"}})
	}
	rs = append(rs, Result{Node: "ok", Verdict: Verdict{Verdict: "ok"}}, Result{Node: "x", Err: errors.New("down")})
	s := Summarize(rs)
	if s.Proven != 1 || s.Total != 10 || len(s.Failing) != MaxFailing || s.Failing[0].Node != "n0" {
		t.Errorf("%+v", s)
	}
	if st := s.Status(); st["summary"] != "1/10" {
		t.Errorf("%v", st)
	}
}

// TestProbeBounded: an answer too large, not JSON or of an unknown verdict
// is an error for that node only.
func TestProbeBounded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/big":
			fmt.Fprintf(w, `{"verdict":"ok","x":"%s"}`, strings.Repeat("a", maxBody))
		case "/odd":
			fmt.Fprint(w, `{"verdict":"maybe"}`)
		case "/ok":
			fmt.Fprint(w, `{"verdict":"ok","ok":true}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	rs := NewProber(nil).Probe(context.Background(), []Agent{{"a", srv.URL + "/big"}, {"b", srv.URL + "/odd"}, {"c", srv.URL + "/ok"}, {"d", srv.URL + "/none"}})
	if rs[0].Err == nil || !strings.Contains(rs[0].Err.Error(), "over") || rs[1].Err == nil || rs[2].Err != nil || !rs[2].Verdict.OK || rs[3].Err == nil {
		t.Errorf("%+v", rs)
	}
}
