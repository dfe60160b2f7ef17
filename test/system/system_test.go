package system

import (
	"context"
	"os"
	"testing"
	"time"
)

// TestWholeSystem runs the scenario (see Run): install with helm, prep,
// peer pulls in a rollout, faults, uninstall, and the rollout without the
// addon; every step checks itself, and the report must show what users
// buy the addon for.
func TestWholeSystem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, mount namespaces, cgroups, containerd, kubelet")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	rep, err := Run(ctx, Options{Nodes: 3, Say: t.Logf, Logf: t.Logf, Phase: func(name string, step func() error) error {
		var err error
		t.Run(name, func(t *testing.T) {
			// The scenario's error, with pod logs and log tails, ends
			// TestWholeSystem below.
			if err = step(); err != nil {
				t.Error(err)
			}
		})
		return err
	}})
	if rep != nil {
		t.Logf("report:\n%s", rep)
	}
	if err != nil {
		t.Fatal(err)
	}
	with, without := rep.PullsOf("rollout"), rep.PullsOf("baseline")
	if len(with) != 3 || len(without) != 3 {
		t.Fatalf("%d pulls with the addon and %d without, want 3 each", len(with), len(without))
	}
	// Later nodes: from peers with the addon, from the upstream without.
	if w, wo := rep.MeanLater("rollout"), rep.MeanLater("baseline"); w >= wo {
		t.Errorf("later nodes pulled in %v on average with the addon, %v without: the addon did not speed them up", w, wo)
	}
	if w, wo := rep.Timings["rollout with addon"], rep.Timings["rollout without addon"]; w >= wo {
		t.Errorf("scaling out took %v with the addon, %v without", w, wo)
	}
	var upWith, upWithout int64
	for i := range with {
		upWith += with[i].UpstreamBlobBytes
		upWithout += without[i].UpstreamBlobBytes
	}
	if upWith*2 > upWithout {
		t.Errorf("upstream blob bytes: %d with the addon, %d without: want at most half", upWith, upWithout)
	}
	for _, step := range []string{"cluster start", "install to agents ready", "rollout with addon", "update with agent pod deleted",
		"fresh node pod running", "uninstall", "rollout without addon"} {
		if rep.Timings[step] <= 0 {
			t.Errorf("no wall time for %q", step)
		}
	}
}
