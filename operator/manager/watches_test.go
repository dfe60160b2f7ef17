package manager

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/operator/values"
)

// writeWatches writes one watches.yaml entry for the Spegel kind and the
// repository's chart, with extra fields appended.
func writeWatches(t *testing.T, extra string) string {
	t.Helper()
	chart, err := filepath.Abs(filepath.Join("..", "..", "helm-charts", "spegel"))
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "watches.yaml")
	body := "- group: charts.fleetmirror.dev\n  version: v1alpha1\n  kind: Spegel\n  chart: " + chart + "\n" + extra
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestWatchesRefused: a field the operator would not honour, or a value
// the reconciler would reject later, stops the start with its name.
func TestWatchesRefused(t *testing.T) {
	for _, tc := range []struct{ name, extra, want string }{
		{"selector", "  selector:\n    matchLabels: {shard: a}\n", "selector is not supported"},
		{"unknown field", "  reconcilePeriode: 1m\n", `unknown field "reconcilePeriode"`},
		{"zero concurrency", "  maxConcurrentReconciles: 0\n", "maxConcurrentReconciles is 0"},
		{"negative period", "  reconcilePeriod: -1m\n", "reconcilePeriod -1m0s is negative"},
		{"bad override", "  overrideValues:\n    \"a[x]\": \"1\"\n", `overrideValues "a[x]"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadWatches(writeWatches(t, tc.extra))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to say %q", err, tc.want)
			}
			t.Log(err)
		})
	}
}

// TestWatchesHonoured: reconcilePeriod replaces the flag for its kind,
// maxConcurrentReconciles is read, and overrideValues (environment
// expanded, as the library does) win over the provider override and the
// spec in the values the release renders.
func TestWatchesHonoured(t *testing.T) {
	t.Setenv("FM_TEST_LEVEL", "debug")
	ws, err := loadWatches(writeWatches(t, "  reconcilePeriod: 30s\n  maxConcurrentReconciles: 2\n"+
		"  overrideValues:\n    logLevel: $FM_TEST_LEVEL\n    containerdPrep.enabled: \"false\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	w := ws[0]
	if got := reconcilePeriod(w, 10*time.Minute); got != 30*time.Second {
		t.Errorf("reconcile period %s, want the entry's 30s over the flag's 10m", got)
	}
	if w.MaxConcurrentReconciles == nil || *w.MaxConcurrentReconciles != 2 {
		t.Errorf("maxConcurrentReconciles = %v, want 2", w.MaxConcurrentReconciles)
	}
	in := values.Inputs{
		Images:    map[string]string{values.AgentImage: "ghcr.io/fleetmirror/agent:v1", values.OperatorImage: "ghcr.io/fleetmirror/operator:v1"},
		Defaults:  map[string]any{"logLevel": "warn", "containerdPrep": map[string]any{"enabled": true}},
		Overrides: w.OverrideValues,
	}
	vals, err := values.Translate(map[string]any{"logLevel": "error", "containerdPrep": map[string]any{"enabled": true}}, "spegel-operator-network-key", in)
	if err != nil {
		t.Fatal(err)
	}
	if vals["logLevel"] != "debug" {
		t.Errorf("logLevel = %v, want the override's debug", vals["logLevel"])
	}
	if on := vals["containerdPrep"].(map[string]any)["enabled"]; on != false {
		t.Errorf("containerdPrep.enabled = %#v, want false from the override", on)
	}

	ws, err = loadWatches(writeWatches(t, ""))
	if err != nil {
		t.Fatal(err)
	}
	if got := reconcilePeriod(ws[0], 10*time.Minute); got != 10*time.Minute {
		t.Errorf("reconcile period %s without the field, want the flag's 10m", got)
	}
}

// TestShippedWatches: the watches.yaml in the images loads.
func TestShippedWatches(t *testing.T) {
	if _, err := loadWatches(filepath.Join("..", "..", "watches.yaml")); err != nil {
		t.Fatal(err)
	}
}
