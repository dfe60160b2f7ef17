package operator

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestChartUsesAgentFlags: every FLEETMIRROR_* variable the chart sets on
// the agent is the env twin of a flag the agent defines, so a renamed
// flag fails here instead of being silently ignored on the nodes.
func TestChartUsesAgentFlags(t *testing.T) {
	flags := map[string]bool{}
	files, _ := filepath.Glob(filepath.Join(repoRoot, "cmd", "agent", "*.go"))
	def := regexp.MustCompile(`fs\.(?:[A-Za-z]+Var\(&?[^,]+,|Var\([^,]+,|String\(|Bool\(|Duration\(|Int\()\s*"([a-z0-9-]+)"`)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range def.FindAllStringSubmatch(string(b), -1) {
			flags[m[1]] = true
		}
	}
	if !flags["mirror-resolve-timeout"] || !flags["certs-dir"] {
		t.Fatalf("could not read the agent's flags from cmd/agent (found %d)", len(flags))
	}
	ch := loadChart(t)
	env := regexp.MustCompile(`name: FLEETMIRROR_([A-Z0-9_]+)`)
	arg := regexp.MustCompile(`- --([a-z0-9-]+)=`)
	for _, c := range loadCases(t) {
		out := render(t, ch, c)
		var used []string
		for _, m := range env.FindAllStringSubmatch(out, -1) {
			used = append(used, strings.ToLower(strings.ReplaceAll(m[1], "_", "-")))
		}
		for _, m := range arg.FindAllStringSubmatch(out, -1) {
			used = append(used, m[1])
		}
		for _, name := range used {
			switch {
			case flags[name]:
			case name == "namespace" || name == "daemonset":
				// cleanup-wait's flags (cmd/operator).
			default:
				t.Errorf("%s: the chart passes --%s, which the agent does not define", c.Name, name)
			}
		}
	}
}
