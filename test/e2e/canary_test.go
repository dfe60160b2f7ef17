package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// canaryPeriod is the agents' --canary-interval here: each broken setup
// must show within one period, and each fix too.
const canaryPeriod = 3 * time.Second

// TestCanary breaks one node's mirror path in each way users meet and
// checks that its canary names the broken setting within one check period,
// its readiness fails with that reason, and the fix turns it back; the
// other node stays proven throughout, and nothing reaches the upstream.
func TestCanary(t *testing.T)   { canarySuite(t, cluster.Containerd2) }
func TestCanary16(t *testing.T) { canarySuite(t, cluster.Containerd16) }

// canaryStatus is GET /canary.
type canaryStatus struct {
	Verdict, Step, Reason, Image, Containerd string
	OK                                       bool
	LastRun                                  *time.Time
	DurationSeconds                          float64
	Requests                                 int
	Bytes                                    int64
	Runs                                     int64
}

func canarySuite(t *testing.T, version string) {
	if os.Geteuid() != 0 {
		t.Fatal("the e2e suite needs root for network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := startCluster(t, ctx, cluster.Options{Nodes: 2, Containerd: version, AgentBin: agentBin(t), Logf: t.Logf,
		AgentArgs: []string{"--canary-interval=" + canaryPeriod.String(), "--canary-gates-readiness=true"}})
	e := &env{t: t, ctx: ctx, c: c}
	n1 := c.Node(1)
	// Nothing pulls in this test but the canaries.
	c.Upstream.Reset()

	t.Run("healthy: proven on every node", func(t *testing.T) {
		for _, n := range c.Nodes {
			// StartAgent waited for readiness, which the canary gates.
			st := e.canary(t, n)
			if !st.OK || st.Verdict != "ok" || st.LastRun == nil {
				t.Fatalf("%s: %+v", n.Name, st)
			}
			t.Logf("%s: containerd %s pulled %s through its agent: %d requests, %d bytes, %.0f ms",
				n.Name, st.Containerd, st.Image, st.Requests, st.Bytes, st.DurationSeconds*1000)
			m := e.metrics(t, n)
			if m.Sum("fleetmirror_canary_ok") != 1 || m.Sum("fleetmirror_canary_runs_total", "result", "ok") < 1 {
				t.Errorf("%s: canary metrics ok=%v runs{ok}=%v", n.Name, m.Sum("fleetmirror_canary_ok"), m.Sum("fleetmirror_canary_runs_total", "result", "ok"))
			}
		}
		// The canary is never advertised: the node offers its peers nothing.
		for _, n := range c.Nodes {
			if adv := e.metrics(t, n).Sum("fleetmirror_advertised_keys"); adv != 0 {
				t.Errorf("%s advertises %v keys, holding only canaries", n.Name, adv)
			}
		}
	})

	config := readFile(t, n1.ConfigPath)
	restore := func(t *testing.T) {
		t.Helper()
		e.rewriteConfig(t, n1, config)
		e.waitCanary(t, n1, "ok", "")
	}
	certs := fmt.Sprintf("config_path = %q", n1.CertsDir)

	t.Run("a/config_path removed", func(t *testing.T) {
		var kept []string
		for _, l := range strings.Split(config, "\n") {
			if !strings.Contains(l, "config_path") {
				kept = append(kept, l)
			}
		}
		e.rewriteConfig(t, n1, strings.Join(kept, "\n"))
		st := e.waitCanary(t, n1, "failed", "pull")
		mustSay(t, st.Reason, "did not ask this agent", certs, "lookup canary.fleetmirror.invalid")
		e.notReady(t, n1, "did not ask this agent")
		restore(t)
	})

	t.Run("b/discard_unpacked_layers = true", func(t *testing.T) {
		e.rewriteConfig(t, n1, replaceOnce(t, config, "discard_unpacked_layers = false", "discard_unpacked_layers = true"))
		st := e.waitCanary(t, n1, "failed", "content")
		mustSay(t, st.Reason, "discard_unpacked_layers = true")
		e.notReady(t, n1, "discard_unpacked_layers")
		restore(t)
	})

	t.Run("c/mirrored registry's hosts.toml deleted, agent does not write them", func(t *testing.T) {
		n1.AgentFlags = []string{"--containerd-mirror-add=false"}
		e.restartAgent(t, n1, true)
		file := filepath.Join(n1.CertsDir, c.Upstream.Host(), "hosts.toml")
		written := readFile(t, file)
		if err := os.Remove(file); err != nil {
			t.Fatal(err)
		}
		st := e.waitCanary(t, n1, "failed", "mirrored-hosts")
		mustSay(t, st.Reason, file+" is missing", "--containerd-mirror-add=false", "`agent hosts`")
		e.notReady(t, n1, "is missing")
		if err := os.WriteFile(file, []byte(written), 0o644); err != nil {
			t.Fatal(err)
		}
		e.waitCanary(t, n1, "ok", "")
		n1.AgentFlags = nil
		e.restartAgent(t, n1, true)
	})

	// The agent writes hosts.toml again when containerd comes back: the
	// restart after prep migrated a mirror into a folder of its own is
	// when the agent must join it (agent/hosts keptRegistries).
	t.Run("hosts.toml written again when containerd restarts", func(t *testing.T) {
		file := filepath.Join(n1.CertsDir, c.Upstream.Host(), "hosts.toml")
		written := readFile(t, file)
		if err := os.Remove(file); err != nil {
			t.Fatal(err)
		}
		if err := n1.RestartContainerd(e.ctx); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			b, err := os.ReadFile(file)
			if err == nil && string(b) == written {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not written again within 30 s of containerd's restart: %v", file, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		e.waitCanary(t, n1, "ok", "")
	})

	t.Run("d/mirror target where nothing listens", func(t *testing.T) {
		n1.AgentFlags = []string{"--mirror-target=http://127.0.0.1:30029"}
		e.restartAgent(t, n1, false)
		st := e.waitCanary(t, n1, "failed", "pull")
		mustSay(t, st.Reason, "cannot reach this agent at its mirror target http://127.0.0.1:30029", "connection refused")
		e.notReady(t, n1, "mirror target")
		n1.AgentFlags = nil
		e.restartAgent(t, n1, true)
		e.waitCanary(t, n1, "ok", "")
	})

	if version == cluster.Containerd2 {
		t.Run("e/transfer service: a config_path list bypasses hosts.toml", func(t *testing.T) {
			// From 2.1 CRI pulls go through the transfer service, which
			// takes CRI's config_path as one folder: a list, as on EKS,
			// is a folder that does not exist (containerd#12415).
			list := fmt.Sprintf("config_path = %q", n1.CertsDir+":/etc/docker/certs.d")
			listed := replaceOnce(t, config, certs, list)
			e.rewriteConfig(t, n1, listed)
			st := e.waitCanary(t, n1, "failed", "pull")
			mustSay(t, st.Reason, "did not ask this agent", "transfer service", "use_local_image_pull")
			// The same list on CRI's own pull path is read like $PATH.
			e.rewriteConfig(t, n1, replaceOnce(t, listed, `snapshotter = "overlayfs"`, `snapshotter = "overlayfs"`+"\n    use_local_image_pull = true"))
			e.waitCanary(t, n1, "ok", "")
			restore(t)
		})
		t.Run("e/transfer service: its own config_path does not matter to CRI", func(t *testing.T) {
			// CRI hands the transfer service its own config_path, so the
			// transfer plugin's (what ctr uses) cannot make CRI bypass.
			i := strings.Index(config, `[plugins."io.containerd.transfer.v1.local"]`)
			if i < 0 {
				t.Fatal("no transfer table in the node's config")
			}
			e.rewriteConfig(t, n1, config[:i]+strings.Replace(config[i:], certs, `config_path = "/nonexistent/certs.d"`, 1))
			e.waitCanary(t, n1, "ok", "")
			restore(t)
		})
	}

	t.Run("healthy again: nothing upstream, nothing left", func(t *testing.T) {
		for _, n := range c.Nodes {
			if st := e.canary(t, n); !st.OK {
				t.Errorf("%s: %+v", n.Name, st)
			}
		}
		st := c.Upstream.Stats()
		var total int64
		for _, n := range c.Nodes {
			total += upstreamRequests(st, n)
		}
		if total != 0 || len(st.ByKind) != 0 {
			t.Errorf("the upstream saw requests during canaries: %+v", st.ByKind)
		}
		// Stopping waits for a run in progress, which removes its image.
		if err := c.StopAgents(); err != nil {
			t.Fatal(err)
		}
		for _, n := range c.Nodes {
			imgs, err := n.ListImages(e.ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, im := range imgs {
				t.Errorf("%s still has image %v %v", n.Name, im.RepoTags, im.RepoDigests)
			}
			blobs, _ := os.ReadDir(filepath.Join(n.ContentDir, "blobs", "sha256"))
			for _, b := range blobs {
				t.Errorf("%s still has blob %s", n.Name, b.Name())
			}
		}
	})
}

func (e *env) canary(t *testing.T, n *cluster.Node) canaryStatus {
	t.Helper()
	var st canaryStatus
	getJSON(t, e.ctx, "GET", strings.TrimSuffix(n.MetricsURL(), "/metrics")+"/canary", nil, &st)
	return st
}

// waitCanary waits for a run that ends after now with verdict (and step),
// at most one check period plus the run itself.
func (e *env) waitCanary(t *testing.T, n *cluster.Node, verdict, step string) canaryStatus {
	t.Helper()
	since := time.Now()
	deadline := since.Add(canaryPeriod + 10*time.Second)
	for {
		st := e.canary(t, n)
		if st.LastRun != nil && st.LastRun.After(since) && st.Verdict == verdict && st.Step == step {
			t.Logf("%s: %s after %v: %s", n.Name, verdict, time.Since(since).Round(100*time.Millisecond), st.Reason)
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %s %s verdict within %v; last: %+v\n%s", n.Name, verdict, step, deadline.Sub(since), st, n.LogTail(20))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// notReady checks that the agent's readiness fails with the canary's reason.
func (e *env) notReady(t *testing.T, n *cluster.Node, says string) {
	t.Helper()
	resp, err := http.Get("http://" + n.RegistryAddr() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), says) {
		t.Errorf("%s /readyz: %s %s, want 503 saying %q", n.Name, resp.Status, b, says)
	}
}

// rewriteConfig writes the node's containerd config and restarts
// containerd, as prep (or a person) does.
func (e *env) rewriteConfig(t *testing.T, n *cluster.Node, config string) {
	t.Helper()
	if err := os.WriteFile(n.ConfigPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := n.RestartContainerd(e.ctx); err != nil {
		t.Fatal(err)
	}
}

func (e *env) restartAgent(t *testing.T, n *cluster.Node, ready bool) {
	t.Helper()
	if err := n.StopAgent(); err != nil {
		t.Fatal(err)
	}
	start := n.StartAgentLive
	if ready {
		start = n.StartAgent
	}
	if err := start(e.ctx); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func replaceOnce(t *testing.T, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("%q not found in:\n%s", old, s)
	}
	return strings.Replace(s, old, new, 1)
}

func mustSay(t *testing.T, reason string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(reason, p) {
			t.Errorf("reason %q\nlacks %q", reason, p)
		}
	}
}
