package system

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"

	"github.com/fleetmirror/fleetmirror/agent/canary"
	"github.com/fleetmirror/fleetmirror/agent/nodetaint"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
	"github.com/fleetmirror/fleetmirror/operator/readiness"
	"github.com/fleetmirror/fleetmirror/test/cluster"
	"github.com/fleetmirror/fleetmirror/test/kube"
)

// The check periods and bounds of issue 16's proof, short here so every
// transition shows within seconds; the install sets them through the
// charts' values (defaults in brackets).
const (
	// canaryInterval is the spegel chart's canaryInterval [5m]: how often
	// each agent proves its path besides at start and containerd restarts.
	canaryInterval = 10 * time.Second
	// mirrorPathPeriod is the operator chart's mirrorPathPeriod [1m]: how
	// often the operator reads every agent's verdict.
	mirrorPathPeriod = 3 * time.Second
	// checkPeriod is one check period: a broken or fixed path shows on the
	// node within it, plus the run itself and pollSlack.
	checkPeriod = canaryInterval + mirrorPathPeriod
	pollSlack   = 15 * time.Second
	// releaseAfter is nodeReadiness.releaseAfter [5m]: the longest the
	// operator holds a node; releaseTaintAfter the agents' own fallback
	// when the operator is down [releaseAfter + 1m].
	releaseAfter      = 30 * time.Second
	releaseTaintAfter = 35 * time.Second
	// operatorName is the operator chart's Deployment for Release.
	operatorName = Release + "-operator"
)

var startupTaint = corev1.Taint{Key: readiness.TaintKey, Effect: corev1.TaintEffectNoSchedule}

// checkMirrorPath is the healthy half of the proof: after install and
// prep every node's FleetmirrorMirrorPath condition is True, the Spegel
// resource counts every node proven, the upstream was never asked for
// the canary, and no node keeps a canary image or any of its content.
func (s *scenario) checkMirrorPath(ctx context.Context) error {
	n := len(s.c.Nodes)
	s.say("Every agent proves its node's mirror path: containerd pulls the agent's canary (%s/%s, served by the agent alone) through the CRI, every %v here (canaryInterval, 5m by default); the operator reads each verdict every %v (mirrorPathPeriod, 1m by default) into the node condition %s and the Spegel status.",
		canary.Registry, canary.Repository, canaryInterval, mirrorPathPeriod, mirrorpath.ConditionType)
	t0 := time.Now()
	if err := s.waitAllProven(ctx, n, 2*time.Minute); err != nil {
		return err
	}
	s.rep.time("mirror path proven on every node", time.Since(t0))
	out, _ := s.kubectlGetSpegel(ctx)
	s.say("  %d/%d nodes proven %v after prep:\n%s\n%s", n, n, time.Since(t0).Round(100*time.Millisecond), indent(out), indent(s.kubectlGetNodes(ctx)))
	// A run may be in flight now: what is left must stay for a second.
	if err := s.checkNoCanaryLeft(ctx, 3*time.Second); err != nil {
		return err
	}
	if err := s.checkNoCanaryUpstream(); err != nil {
		return err
	}
	s.say("  the upstream's request log names no canary repository; no node lists a canary image or holds its content")
	return nil
}

// faultConfigs breaks three nodes' containerd config at once, each in its
// own way (issue 16 a, b and e), and fixes them: prep the first two, the
// README's one-folder config_path the third.
func (s *scenario) faultConfigs(ctx context.Context) error {
	a, b, e := s.c.Nodes[0], s.c.Nodes[1], s.c.Nodes[2]
	s.say("Breaking three nodes at once, as a node image update or a hand edit would, and restarting their containerd: %s loses config_path, %s gets discard_unpacked_layers = true, %s (containerd 2.x) gets CRI's config_path as a list, as EKS ships it, which the transfer service reads as one folder that does not exist.", a.Name, b.Name, e.Name)
	cfgA, err := os.ReadFile(a.ConfigPath)
	if err != nil {
		return err
	}
	cfgB, err := os.ReadFile(b.ConfigPath)
	if err != nil {
		return err
	}
	cfgE, err := os.ReadFile(e.ConfigPath)
	if err != nil {
		return err
	}
	// CRI's registry table, not the transfer plugin's: CRI hands the
	// transfer service its own config_path.
	const criRegistry = `[plugins."io.containerd.cri.v1.images".registry]`
	i := strings.Index(string(cfgE), criRegistry)
	j := strings.Index(string(cfgE)[max(i, 0):], `config_path = "/etc/containerd/certs.d"`)
	if i < 0 || j < 0 {
		return fmt.Errorf("%s: no config_path in %s after prep:\n%s", e.Name, criRegistry, cfgE)
	}
	listed := string(cfgE)[:i+j] + strings.Replace(string(cfgE)[i+j:], `"/etc/containerd/certs.d"`, `"/etc/containerd/certs.d:/etc/docker/certs.d"`, 1)
	var kept []string
	for _, l := range strings.Split(string(cfgA), "\n") {
		if !strings.Contains(l, "config_path") {
			kept = append(kept, l)
		}
	}
	if !strings.Contains(string(cfgB), "discard_unpacked_layers = false") {
		return fmt.Errorf("%s: config.toml lacks discard_unpacked_layers = false after prep:\n%s", b.Name, cfgB)
	}
	broken := map[*cluster.Node]string{
		a: strings.Join(kept, "\n"),
		b: strings.Replace(string(cfgB), "discard_unpacked_layers = false", "discard_unpacked_layers = true", 1),
		e: listed,
	}
	nodes := []*cluster.Node{a, b, e}
	t0 := time.Now()
	for _, n := range nodes {
		if err := os.WriteFile(n.ConfigPath, []byte(broken[n]), 0o644); err != nil {
			return err
		}
	}
	// All at once; each restart itself runs a canary, and one check
	// period bounds the rest.
	if err := parallel(func(n *cluster.Node) error { return n.RestartContainerd(ctx) }, nodes...); err != nil {
		return err
	}
	cases := []struct {
		n            *cluster.Node
		step, reason string
		says         []string
	}{
		{a, canary.StepPull, "CanaryFailedPull", []string{"did not ask this agent"}},
		{b, canary.StepContent, "CanaryFailedContent", []string{"discard_unpacked_layers = true"}},
		{e, canary.StepPull, "CanaryFailedPull", []string{"did not ask this agent", "transfer service"}},
	}
	restarted := time.Now()
	got := make([]string, len(cases))
	took := make([]time.Duration, len(cases))
	err = parallel(func(n *cluster.Node) error {
		i := slices.Index(nodes, n)
		c := cases[i]
		var err error
		if _, got[i], err = s.waitCondition(ctx, c.n.Name, "False", c.reason, c.says, checkPeriod+pollSlack); err != nil {
			return err
		}
		took[i] = time.Since(restarted)
		return s.waitFailing(ctx, c.n.Name, c.step, mirrorPathPeriod+pollSlack)
	}, nodes...)
	if err != nil {
		return err
	}
	for i, c := range cases {
		s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("%s (%s) broken: condition False %v after containerd's restart", c.n.Name, c.step, took[i].Round(100*time.Millisecond)))
		s.say("  %s: %s False (%s) %v after the restart: %s", c.n.Name, mirrorpath.ConditionType, c.reason, took[i].Round(100*time.Millisecond), short(got[i]))
	}
	out, _ := s.kubectlGetSpegel(ctx)
	s.say("  the Spegel resource names all three:\n%s", indent(out))
	// Readiness: the canary gates each agent's, and node readiness never
	// holds a node whose agent was ready once (an upgrade or a broken
	// config must not take working nodes away); the taint proof is a
	// joining node's (faultNeverReady).
	for _, n := range nodes {
		if err := s.waitAgentReady(ctx, n.Name, false, 45*time.Second); err != nil {
			return err
		}
		node, err := s.c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if hasTaint(node, readiness.TaintKey) || node.Annotations[readiness.ReadyAnnotation] == "" {
			return fmt.Errorf("%s: startup taint %v, annotation %s=%q: a node whose agent was ready once must stay schedulable", n.Name, hasTaint(node, readiness.TaintKey), readiness.ReadyAnnotation, node.Annotations[readiness.ReadyAnnotation])
		}
	}
	s.say("  the three agents turn NotReady (the canary gates readiness); the nodes stay schedulable: they were ready once (%s), and node readiness never holds such a node again", readiness.ReadyAnnotation)

	s.say("Fixing them the way the README says: deleting the containerd-prep pods of %s and %s, so prep patches config.toml again and restarts containerd; on %s (prep refuses a list) config_path naming the one folder again, and a restart.", a.Name, b.Name, e.Name)
	t1 := time.Now()
	if err := os.WriteFile(e.ConfigPath, cfgE, 0o644); err != nil {
		return err
	}
	if err := e.RestartContainerd(ctx); err != nil {
		return err
	}
	for _, n := range []*cluster.Node{a, b} {
		pod, err := s.podOn(ctx, Namespace, "app.kubernetes.io/component=containerd-prep", n.Name)
		if err != nil {
			return err
		}
		if err := s.c.Client.CoreV1().Pods(Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
			return err
		}
	}
	err = parallel(func(n *cluster.Node) error {
		i := slices.Index(nodes, n)
		if _, _, err := s.waitCondition(ctx, n.Name, "True", "CanaryPulled", nil, 2*time.Minute); err != nil {
			return err
		}
		took[i] = time.Since(t1)
		return nil
	}, nodes...)
	if err != nil {
		return err
	}
	for i, n := range nodes {
		s.say("  %s: %s True again %v after the fix began", n.Name, mirrorpath.ConditionType, took[i].Round(100*time.Millisecond))
	}
	if err := s.waitAllProven(ctx, len(s.c.Nodes), time.Minute); err != nil {
		return err
	}
	s.rep.time("config faults a, b, e found and fixed", time.Since(t0))
	s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("a, b fixed by prep, e by hand: all proven again in %v", time.Since(t1).Round(100*time.Millisecond)))
	return nil
}

// faultHostsDeleted is issue 16 c: with containerdMirrorAdd false the node
// writes the mirrored registries' hosts.toml, and one of them goes.
func (s *scenario) faultHostsDeleted(ctx context.Context) error {
	n := s.c.Nodes[2]
	s.say("Switching the Spegel resource to containerdMirrorAdd: false, as when node user data writes hosts.toml (`agent hosts` prints them); the agents roll and keep the files they wrote.")
	t0 := time.Now()
	if err := s.patchSpec(ctx, map[string]any{"containerdMirrorAdd": false}); err != nil {
		return err
	}
	if err := s.waitAgentRollout(ctx, "FLEETMIRROR_CONTAINERD_MIRROR_ADD", "false"); err != nil {
		return err
	}
	file := filepath.Join(n.CertsDir, s.c.Upstream.Host(), "hosts.toml")
	written, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	s.say("  rolled in %v; deleting %s's hosts.toml for %s", time.Since(t0).Round(100*time.Millisecond), n.Name, s.c.Upstream.Host())
	t1 := time.Now()
	if err := os.Remove(file); err != nil {
		return err
	}
	took, msg, err := s.waitCondition(ctx, n.Name, "False", "CanaryFailedMirroredHosts", []string{"is missing", "--containerd-mirror-add=false", "`agent hosts`"}, checkPeriod+pollSlack)
	if err != nil {
		return err
	}
	if err := s.waitFailing(ctx, n.Name, canary.StepMirroredHosts, mirrorPathPeriod+pollSlack); err != nil {
		return err
	}
	s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("c broken: condition False in %v", took.Round(100*time.Millisecond)))
	s.say("  %s: %s False (CanaryFailedMirroredHosts) %v after the file went: %s", n.Name, mirrorpath.ConditionType, took.Round(100*time.Millisecond), short(msg))
	if err := os.WriteFile(file, written, 0o644); err != nil {
		return err
	}
	if took, _, err = s.waitCondition(ctx, n.Name, "True", "CanaryPulled", nil, checkPeriod+pollSlack); err != nil {
		return err
	}
	s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("c fixed: condition True in %v", took.Round(100*time.Millisecond)))
	s.say("  the node's file written again: True %v later (%v for the whole break and fix); back to containerdMirrorAdd: true", took.Round(100*time.Millisecond), time.Since(t1).Round(100*time.Millisecond))
	if err := s.patchSpec(ctx, map[string]any{"containerdMirrorAdd": nil}); err != nil {
		return err
	}
	if err := s.waitAgentRollout(ctx, "FLEETMIRROR_CONTAINERD_MIRROR_ADD", "true"); err != nil {
		return err
	}
	if err := s.waitAllProven(ctx, len(s.c.Nodes), time.Minute); err != nil {
		return err
	}
	s.rep.time("hosts.toml fault c found and fixed", time.Since(t0))
	return nil
}

// faultMirrorTarget is issue 16 d: the mirror target at a port nothing
// listens on. The spec change rolls the agents one node at a time; the
// first rolled agent's canary fails, it never gets ready, and the rollout
// stops there.
func (s *scenario) faultMirrorTarget(ctx context.Context) error {
	const target = "http://127.0.0.1:30029"
	s.say("Setting mirrorTarget: %s in the Spegel resource, a port nothing listens on: the agents roll one node at a time.", target)
	t0 := time.Now()
	if err := s.patchSpec(ctx, map[string]any{"mirrorTarget": target}); err != nil {
		return err
	}
	if err := s.waitAgentEnv(ctx, "FLEETMIRROR_MIRROR_TARGET", target); err != nil {
		return err
	}
	var victim, msg string
	err := s.c.Poll(ctx, 2*time.Minute, func(ctx context.Context) (bool, string, error) {
		for _, n := range s.c.Nodes {
			st, reason, m, err := s.condition(ctx, n.Name)
			if err != nil {
				return false, err.Error(), nil
			}
			if st == "False" && reason == "CanaryFailedPull" && strings.Contains(m, "cannot reach this agent at its mirror target "+target) {
				victim, msg = n.Name, m
				return true, "", nil
			}
		}
		return false, "no node's condition names the mirror target " + target, nil
	})
	if err != nil {
		return err
	}
	if err := s.waitFailing(ctx, victim, canary.StepPull, mirrorPathPeriod+pollSlack); err != nil {
		return err
	}
	s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("d broken: condition False %v after the spec change (agent pod restart included)", time.Since(t0).Round(100*time.Millisecond)))
	s.say("  %s, the first node rolled: %s False (CanaryFailedPull) %v after the change: %s", victim, mirrorpath.ConditionType, time.Since(t0).Round(100*time.Millisecond), short(msg))
	// Its agent never gets ready, so maxUnavailable 1 stops the rollout:
	// the other nodes keep their proven agents.
	time.Sleep(canaryInterval)
	ds, err := s.c.Client.AppsV1().DaemonSets(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if ds.Status.UpdatedNumberScheduled != 1 {
		return fmt.Errorf("the rollout of the broken mirror target went on past its first node: %d of %d updated", ds.Status.UpdatedNumberScheduled, ds.Status.DesiredNumberScheduled)
	}
	for _, n := range s.c.Nodes {
		if n.Name == victim {
			continue
		}
		if st, reason, _, err := s.condition(ctx, n.Name); err != nil || st != "True" {
			return fmt.Errorf("%s: %s %s (%s) (%v) while only %s was rolled", n.Name, mirrorpath.ConditionType, st, reason, err, victim)
		}
	}
	out, _ := s.kubectlGetSpegel(ctx)
	s.say("  the rollout stopped at %s (1 of %d agents updated; its agent not ready); the rest stay proven:\n%s", victim, ds.Status.DesiredNumberScheduled, indent(out))
	if err := s.patchSpec(ctx, map[string]any{"mirrorTarget": nil}); err != nil {
		return err
	}
	t1 := time.Now()
	if err := s.waitAgentRollout(ctx, "FLEETMIRROR_MIRROR_TARGET", "http://127.0.0.1:30120"); err != nil {
		return err
	}
	if _, _, err := s.waitCondition(ctx, victim, "True", "CanaryPulled", nil, checkPeriod+pollSlack); err != nil {
		return err
	}
	if err := s.waitAllProven(ctx, len(s.c.Nodes), time.Minute); err != nil {
		return err
	}
	s.say("  mirrorTarget removed: %s rolled back and proven again %v later", victim, time.Since(t1).Round(100*time.Millisecond))
	s.rep.time("mirror target fault d found and fixed", time.Since(t0))
	return nil
}

// joinWithOperatorDown is issue 16 f's second node: it joins while the
// operator is scaled to zero, registered with the startup taint; only its
// own agent can release it, past releaseTaintAfter.
func (s *scenario) joinWithOperatorDown(ctx context.Context) (*kube.Kubelet, error) {
	s.say("Scaling the operator to zero; a fresh node joins registered with the startup taint %s (kubelet --register-with-taints, as a node pool with node readiness does). With no operator, its own agent must release it once the node is %v old (releaseTaintAfter; the operator's bound plus a minute by default).",
		readiness.TaintKey, releaseTaintAfter)
	if err := s.scaleOperator(ctx, 0); err != nil {
		return nil, err
	}
	t0 := time.Now()
	tainted := s.watchJoining(ctx, func(n *corev1.Node) (bool, string) {
		return hasTaint(n, readiness.TaintKey), ""
	})
	k, err := s.c.AddNodeWith(ctx, kube.NodeOptions{Taints: []corev1.Taint{startupTaint}})
	if err != nil {
		return nil, err
	}
	s.rep.time("fresh node to Ready", time.Since(t0))
	if seen := <-tainted; seen.err != nil || seen.node != k.Name {
		return nil, fmt.Errorf("%s was never seen with the startup taint it registered with (%v, saw %q)", k.Name, seen.err, seen.node)
	}
	took, err := s.watchReleased(ctx, k.Name, releaseTaintAfter, false)()
	if err != nil {
		return nil, err
	}
	pod, err := s.podOn(ctx, Namespace, "app.kubernetes.io/component=agent", k.Name)
	if err != nil {
		return nil, err
	}
	logs, err := s.c.Client.CoreV1().Pods(Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: "agent"}).DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	const says = "removed the startup taint from this node"
	line := lineWith(logs, says)
	if line == "" {
		// The kubelet may have restarted the container since (here, once,
		// after prep restarted containerd): the release is in the log of
		// the one before.
		prev, err := s.c.Client.CoreV1().Pods(Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: "agent", Previous: true}).DoRaw(ctx)
		if err != nil {
			prev = []byte("(no previous container's log: " + err.Error() + ")")
		}
		line = lineWith(prev, says)
		logs = append(append(prev, "\n--- current container ---\n"...), logs...)
	}
	if line == "" {
		return nil, fmt.Errorf("%s lost its startup taint, but its agent %s did not log %q:\n%s", k.Name, pod.Name, says, logs)
	}
	node, err := s.c.Client.CoreV1().Nodes().Get(ctx, k.Name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	why := node.Annotations[nodetaint.ReleasedAnnotation]
	if !strings.Contains(why, "released by its agent") {
		return nil, fmt.Errorf("%s released by its agent without saying why: annotations %v", k.Name, node.Annotations)
	}
	s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("f, operator down: released by its agent %v after joining (bound %v)", took.Round(100*time.Millisecond), releaseTaintAfter))
	s.say("  %s schedulable %v after it joined, released by its own agent; on the node, %s: %s; in the agent's log: %s", k.Name, took.Round(100*time.Millisecond), nodetaint.ReleasedAnnotation, short(why), short(line))
	if err := s.scaleOperator(ctx, 1); err != nil {
		return nil, err
	}
	return k, nil
}

// lineWith is the last line of logs that contains says, or "".
func lineWith(logs []byte, says string) string {
	line := ""
	for _, l := range strings.Split(string(logs), "\n") {
		if strings.Contains(l, says) {
			line = l
		}
	}
	return line
}

// faultNeverReady is issue 16 f's first node: its agent can never get
// ready, and the operator holds it at most releaseAfter, then releases it
// with a warning, an annotation and the reason in the Spegel status. Its
// broken path is one prep cannot fix: a host_port_ folder its image ships,
// which containerd 2.x reads before the agent's hosts.toml.
func (s *scenario) faultNeverReady(ctx context.Context) error {
	shadow := strings.Replace(s.c.Upstream.Host(), ":", "_", 1) + "_"
	s.say("A node joins whose agent can never get ready: its image ships certs.d/%s/hosts.toml, which containerd 2.x reads before %s/ and which names only the upstream. Node readiness holds it at most %v (nodeReadiness.releaseAfter, 5m by default).",
		shadow, s.c.Upstream.Host(), releaseAfter)
	t0 := time.Now()
	// Held: tainted, and named with its reason in NodesReady, from the
	// moment it registers (the node may be Ready only later).
	held := s.watchJoining(ctx, func(n *corev1.Node) (bool, string) {
		st, reason, msg := s.spegelCondition(ctx, readiness.ConditionType)
		return hasTaint(n, readiness.TaintKey) && st == "False" && reason == "NodesHeld" && strings.Contains(msg, n.Name+": "), msg
	})
	k, err := s.c.AddNodeWith(ctx, kube.NodeOptions{Prepare: func(_ context.Context, n *cluster.Node) error {
		return n.WriteHostsTOML(shadow, cluster.UpstreamHostsTOML(s.c.Upstream))
	}})
	if err != nil {
		return err
	}
	released := s.watchReleased(ctx, k.Name, releaseAfter, true)
	seen := <-held
	if seen.err != nil || seen.node != k.Name {
		return fmt.Errorf("%s was never seen held (tainted and named in %s): %v (saw %q)", k.Name, readiness.ConditionType, seen.err, seen.node)
	}
	s.say("  held: %s carries the startup taint %v after it registered; NodesReady: %s", k.Name, seen.age.Round(100*time.Millisecond), short(seen.msg))
	_, msg, err := s.waitCondition(ctx, k.Name, "False", "CanaryFailedMirroredHosts", []string{"shadows"}, releaseAfter+checkPeriod+pollSlack)
	if err != nil {
		return err
	}
	if err := s.waitFailing(ctx, k.Name, canary.StepMirroredHosts, mirrorPathPeriod+pollSlack); err != nil {
		return err
	}
	s.say("  its canary names the cause, %v after the join started: %s False (CanaryFailedMirroredHosts): %s", time.Since(t0).Round(100*time.Millisecond), mirrorpath.ConditionType, short(msg))
	rel, err := released()
	if err != nil {
		return err
	}
	node, err := s.c.Client.CoreV1().Nodes().Get(ctx, k.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	ann := node.Annotations[readiness.ReleasedAnnotation]
	if ann == "" {
		return fmt.Errorf("%s released without the %s annotation", k.Name, readiness.ReleasedAnnotation)
	}
	ev, err := s.waitEvent(ctx, "NodeReleasedUnready", k.Name)
	if err != nil {
		return err
	}
	// Both name the cause the canary found, not only an unready pod.
	if !strings.Contains(ev, "shadows") || !strings.Contains(ann, "shadows") {
		return fmt.Errorf("%s released without the canary's reason: event %q, annotation %q", k.Name, ev, ann)
	}
	err = s.c.Poll(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		st, reason, msg := s.spegelCondition(ctx, readiness.ConditionType)
		return st == "False" && reason == "NodesReleasedUnready" && strings.Contains(msg, k.Name+": "),
			fmt.Sprintf("%s %s %s: %s", readiness.ConditionType, st, reason, msg), nil
	})
	if err != nil {
		return err
	}
	s.rep.Latencies = append(s.rep.Latencies, fmt.Sprintf("f, agent never ready: released by the operator %v after joining (bound %v)", rel.Round(100*time.Millisecond), releaseAfter))
	s.say("  released %v after it joined (fail open): warning event NodeReleasedUnready: %s; annotation %s: %s", rel.Round(100*time.Millisecond), short(ev), readiness.ReleasedAnnotation, short(ann))

	// Fixed on the node, the next canary proves the path.
	if err := os.RemoveAll(filepath.Join(k.Node.CertsDir, shadow)); err != nil {
		return err
	}
	took, _, err := s.waitCondition(ctx, k.Name, "True", "CanaryPulled", nil, checkPeriod+pollSlack)
	if err != nil {
		return err
	}
	if err := s.waitSpegelReady(ctx, len(s.c.Nodes), 2*time.Minute); err != nil {
		return err
	}
	if err := s.waitAllProven(ctx, len(s.c.Nodes), time.Minute); err != nil {
		return err
	}
	s.say("  the shadowing folder removed: True %v later, its agent ready", took.Round(100*time.Millisecond))
	s.rep.time("never-ready node held, released and fixed", time.Since(t0))
	return nil
}

// joining is what watchJoining saw of a node that joined.
type joining struct {
	node, msg string
	age       time.Duration // since the node's creation
	err       error
}

// watchJoining watches, from now until a node that is not yet in the
// cluster's list meets cond, and sends that node's name and cond's
// message (or an error after two minutes).
func (s *scenario) watchJoining(ctx context.Context, cond func(*corev1.Node) (bool, string)) <-chan joining {
	known := map[string]bool{}
	for _, n := range s.c.Nodes {
		known[n.Name] = true
	}
	ch := make(chan joining, 1)
	go func() {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		for {
			nodes, err := s.c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			if err == nil {
				for i := range nodes.Items {
					n := &nodes.Items[i]
					if known[n.Name] {
						continue
					}
					if ok, msg := cond(n); ok {
						ch <- joining{node: n.Name, msg: msg, age: time.Since(n.CreationTimestamp.Time)}
						return
					}
				}
			}
			select {
			case <-ctx.Done():
				ch <- joining{err: fmt.Errorf("no joining node seen so: %w", ctx.Err())}
				return
			case <-time.After(250 * time.Millisecond):
			}
		}
	}()
	return ch
}

// watchReleased watches node from now until it has lost its startup taint
// (and, if annotated, carries the operator's release annotation); wait
// then checks it kept the taint until about bound after it joined (not
// early) and lost it within bound and pollSlack (fail open), and returns
// when, from the node's creation. Watching from the join on, the moment
// is right even when the caller waits for other things first.
func (s *scenario) watchReleased(ctx context.Context, name string, bound time.Duration, annotated bool) (wait func() (time.Duration, error)) {
	type result struct {
		at  time.Duration
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var at time.Duration
		err := s.c.Poll(ctx, bound+pollSlack+time.Minute, func(ctx context.Context) (bool, string, error) {
			node, err := s.c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error(), nil
			}
			created := node.CreationTimestamp.Time
			if hasTaint(node, readiness.TaintKey) {
				return false, fmt.Sprintf("%s still carries %s, %v after it joined", name, readiness.TaintKey, time.Since(created).Round(time.Second)), nil
			}
			if annotated && node.Annotations[readiness.ReleasedAnnotation] == "" {
				return false, fmt.Sprintf("%s untainted but not yet annotated %s", name, readiness.ReleasedAnnotation), nil
			}
			at = time.Since(created)
			return true, "", nil
		})
		ch <- result{at, err}
	}()
	return func() (time.Duration, error) {
		r := <-ch
		switch {
		case r.err != nil:
			return 0, r.err
		// The creation time has a resolution of a second.
		case r.at < bound-2*time.Second:
			return r.at, fmt.Errorf("%s lost its startup taint %v after it joined, before the bound %v", name, r.at, bound)
		case r.at > bound+pollSlack:
			return r.at, fmt.Errorf("%s lost its startup taint only %v after it joined, bound %v", name, r.at, bound)
		}
		return r.at, nil
	}
}

// condition is node's FleetmirrorMirrorPath condition.
func (s *scenario) condition(ctx context.Context, node string) (status, reason, msg string, err error) {
	n, err := s.c.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return "", "", "", err
	}
	for _, c := range n.Status.Conditions {
		if string(c.Type) == mirrorpath.ConditionType {
			return string(c.Status), c.Reason, c.Message, nil
		}
	}
	return "", "", "", nil
}

// waitCondition waits for node's condition to have status and reason and
// say every one of says; it returns how long that took and the message.
func (s *scenario) waitCondition(ctx context.Context, node, status, reason string, says []string, timeout time.Duration) (time.Duration, string, error) {
	t0 := time.Now()
	var msg string
	err := s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		st, r, m, err := s.condition(ctx, node)
		if err != nil {
			return false, err.Error(), nil
		}
		msg = m
		ok := st == status && r == reason
		for _, w := range says {
			ok = ok && strings.Contains(m, w)
		}
		return ok, fmt.Sprintf("%s: %s %s (%s): %s; want %s (%s) saying %q", node, mirrorpath.ConditionType, st, r, m, status, reason, says), nil
	})
	return time.Since(t0), msg, err
}

// mirrorPathStatus is the Spegel resource's status.mirrorPath.
func (s *scenario) mirrorPathStatus(ctx context.Context) (map[string]any, error) {
	obj, err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	mp, _, _ := unstructured.NestedMap(obj.Object, "status", "mirrorPath")
	return mp, nil
}

// waitFailing waits for status.mirrorPath.failing to name node at step.
func (s *scenario) waitFailing(ctx context.Context, node, step string, timeout time.Duration) error {
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		mp, err := s.mirrorPathStatus(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		failing, _ := mp["failing"].([]any)
		for _, f := range failing {
			m, _ := f.(map[string]any)
			if m["node"] == node && m["step"] == step {
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("status.mirrorPath = %v, want %s failing at %s", mp, node, step), nil
	})
}

// waitAllProven waits for every node's condition True and the Spegel
// status to count n of n proven, none failing.
func (s *scenario) waitAllProven(ctx context.Context, n int, timeout time.Duration) error {
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		mp, err := s.mirrorPathStatus(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		failing, _ := mp["failing"].([]any)
		if mp["proven"] != int64(n) || mp["total"] != int64(n) || len(failing) > 0 {
			return false, fmt.Sprintf("status.mirrorPath = %v, want %d/%d proven", mp, n, n), nil
		}
		for _, node := range s.c.Nodes {
			st, reason, msg, err := s.condition(ctx, node.Name)
			if err != nil || st != "True" {
				return false, fmt.Sprintf("%s: %s %s (%s): %s %v", node.Name, mirrorpath.ConditionType, st, reason, msg, err), nil
			}
		}
		return true, "", nil
	})
}

// spegelCondition is one condition of the Spegel resource.
func (s *scenario) spegelCondition(ctx context.Context, typ string) (status, reason, msg string) {
	obj, err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
	if err != nil {
		return "", "", err.Error()
	}
	conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			st, _ := m["status"].(string)
			r, _ := m["reason"].(string)
			msg, _ := m["message"].(string)
			return st, r, msg
		}
	}
	return "", "", "no " + typ + " condition"
}

// waitEvent waits for a warning event of reason in Namespace naming node,
// and returns its message.
func (s *scenario) waitEvent(ctx context.Context, reason, node string) (string, error) {
	var msg string
	err := s.c.Poll(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		evs, err := s.c.Client.CoreV1().Events(Namespace).List(ctx, metav1.ListOptions{FieldSelector: "reason=" + reason})
		if err != nil {
			return false, err.Error(), nil
		}
		for _, e := range evs.Items {
			if e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "node "+node+" ") {
				msg = e.Message
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("no %s event for %s among %d", reason, node, len(evs.Items)), nil
	})
	return msg, err
}

// patchSpec merges fields into the Spegel resource's spec (nil removes one).
func (s *scenario) patchSpec(ctx context.Context, fields map[string]any) error {
	b, err := json.Marshal(map[string]any{"spec": fields})
	if err != nil {
		return err
	}
	_, err = s.dyn.Resource(SpegelResource).Namespace(Namespace).Patch(ctx, Spegel, types.MergePatchType, b, metav1.PatchOptions{})
	return err
}

// agentEnv is an environment variable of the agent DaemonSet's template.
func agentEnv(ds *appsv1.DaemonSet, name string) string {
	for _, c := range ds.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			if e.Name == name {
				return e.Value
			}
		}
	}
	return ""
}

// waitAgentEnv waits until the operator rendered the agent DaemonSet with
// env name = value.
func (s *scenario) waitAgentEnv(ctx context.Context, name, value string) error {
	return s.c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		ds, err := s.c.Client.AppsV1().DaemonSets(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		got := agentEnv(ds, name)
		return got == value, fmt.Sprintf("agent DaemonSet: %s=%q, want %q", name, got, value), nil
	})
}

// waitAgentRollout waits for the DaemonSet rendered with name = value to
// be rolled out, every agent ready.
func (s *scenario) waitAgentRollout(ctx context.Context, name, value string) error {
	if err := s.waitAgentEnv(ctx, name, value); err != nil {
		return err
	}
	return s.c.Poll(ctx, 3*time.Minute, func(ctx context.Context) (bool, string, error) {
		ds, err := s.c.Client.AppsV1().DaemonSets(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		st := ds.Status
		return st.ObservedGeneration >= ds.Generation && st.UpdatedNumberScheduled == st.DesiredNumberScheduled && st.NumberReady == st.DesiredNumberScheduled && st.NumberUnavailable == 0,
			fmt.Sprintf("daemonset %s: %d updated, %d ready of %d", Spegel, st.UpdatedNumberScheduled, st.NumberReady, st.DesiredNumberScheduled), nil
	})
}

// waitAgentReady waits for the agent pod on node to be Ready (or not).
func (s *scenario) waitAgentReady(ctx context.Context, node string, ready bool, timeout time.Duration) error {
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		p, err := s.podOn(ctx, Namespace, "app.kubernetes.io/component=agent", node)
		if err != nil {
			return false, err.Error(), nil
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady {
				return (c.Status == corev1.ConditionTrue) == ready, fmt.Sprintf("agent pod %s Ready=%s, want %v", p.Name, c.Status, ready), nil
			}
		}
		return false, fmt.Sprintf("agent pod %s has no Ready condition", p.Name), nil
	})
}

// scaleOperator scales the operator's Deployment and waits for it.
func (s *scenario) scaleOperator(ctx context.Context, replicas int32) error {
	deps := s.c.Client.AppsV1().Deployments(Namespace)
	patch := fmt.Sprintf(`{"spec":{"replicas":%d}}`, replicas)
	if _, err := deps.Patch(ctx, operatorName, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("scaling the operator to %d: %w", replicas, err)
	}
	return s.c.Poll(ctx, 2*time.Minute, func(ctx context.Context) (bool, string, error) {
		d, err := deps.Get(ctx, operatorName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		pods, err := s.c.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: metav1.FormatLabelSelector(d.Spec.Selector)})
		if err != nil {
			return false, err.Error(), nil
		}
		st := d.Status
		done := st.ObservedGeneration >= d.Generation && st.ReadyReplicas == replicas && st.Replicas == replicas && len(pods.Items) == int(replicas)
		return done, fmt.Sprintf("operator: %d ready of %d, %d pods", st.ReadyReplicas, replicas, len(pods.Items)), nil
	})
}

// checkNoCanaryLeft checks that no node lists a canary image through CRI
// or holds content pulled from the canary's registry, allowing for a run
// in progress to clean up within grace.
func (s *scenario) checkNoCanaryLeft(ctx context.Context, grace time.Duration) error {
	deadline := time.Now().Add(grace)
	for {
		var left []string
		for _, n := range s.c.Nodes {
			l, err := canaryLeft(ctx, n)
			if err != nil {
				return err
			}
			left = append(left, l...)
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("canary leftovers: %s", strings.Join(left, "; "))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// canaryLeft lists node n's canary images (CRI) and the content labelled
// as pulled from the canary's registry (containerd's content store).
func canaryLeft(ctx context.Context, n *cluster.Node) ([]string, error) {
	imgs, err := n.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	var left []string
	for _, im := range imgs {
		for _, name := range slices.Concat(im.RepoTags, im.RepoDigests) {
			if strings.HasPrefix(name, canary.Registry+"/") {
				left = append(left, n.Name+": image "+name)
			}
		}
	}
	cl, err := client.New(n.Socket, client.WithDefaultNamespace("k8s.io"))
	if err != nil {
		return nil, fmt.Errorf("%s: containerd client: %w", n.Name, err)
	}
	defer cl.Close()
	err = cl.ContentStore().Walk(ctx, func(info content.Info) error {
		for k, v := range info.Labels {
			if strings.Contains(k, canary.Registry) || strings.Contains(v, canary.Repository) {
				left = append(left, fmt.Sprintf("%s: content %s (%s=%s)", n.Name, info.Digest, k, v))
				break
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: walking the content store: %w", n.Name, err)
	}
	return left, nil
}

// checkNoCanaryUpstream checks that the upstream registry was never asked
// for anything of the canary, by repository or registry name.
func (s *scenario) checkNoCanaryUpstream() error {
	repos := s.c.Upstream.Stats().Repositories
	if len(repos) == 0 {
		return fmt.Errorf("the upstream's request log is empty: it cannot show anything")
	}
	for r, count := range repos {
		if strings.Contains(r, canary.Repository) || strings.Contains(r, canary.Registry) {
			return fmt.Errorf("the upstream was asked %d times for %s", count, r)
		}
	}
	return nil
}

// kubectlGetNodes is `kubectl get nodes` with the condition and the taint.
func (s *scenario) kubectlGetNodes(ctx context.Context) string {
	nodes, err := s.c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-24s %-6s %-22s %s", "NODE", "PATH", "REASON", "STARTUP TAINT")
	for _, n := range nodes.Items {
		st, reason := "-", "-"
		for _, c := range n.Status.Conditions {
			if string(c.Type) == mirrorpath.ConditionType {
				st, reason = string(c.Status), c.Reason
			}
		}
		fmt.Fprintf(&b, "\n%-24s %-6s %-22s %v", n.Name, st, reason, hasTaint(&n, readiness.TaintKey))
	}
	return b.String()
}

func hasTaint(n *corev1.Node, key string) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key {
			return true
		}
	}
	return false
}

// parallel runs f for each node at once and joins the errors.
func parallel(f func(*cluster.Node) error, nodes ...*cluster.Node) error {
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() { errs[i] = f(n) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// short is a message cut to one readable line.
func short(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 240 {
		s = s[:240] + "…"
	}
	return s
}
