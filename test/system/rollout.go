package system

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"regexp"
	"sort"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"

	"github.com/fleetmirror/fleetmirror/agent/nodetaint"
	"github.com/fleetmirror/fleetmirror/operator/readiness"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// rollout puts the workload on one node, then scales it to every node:
// the later nodes must get every layer from peers, and faster.
func (s *scenario) rollout(ctx context.Context) error {
	ref, err := s.pushWorkload(ctx, 1, "v1")
	if err != nil {
		return err
	}
	s.c.Upstream.SetShaping(s.opts.UpstreamRate, s.opts.UpstreamLatency)
	n := len(s.c.Nodes)
	s.say("Rolling out %s: one replica, then %d (one per node). The upstream's link is shaped to %d MB/s with %v per request; peers' links are not.",
		workloadName, n, s.opts.UpstreamRate>>20, s.opts.UpstreamLatency)
	ps, took, err := s.scaleAndMeasure(ctx, "rollout", ref, n)
	if err != nil {
		return err
	}
	s.rep.time("rollout with addon", took)
	first := ps[0]
	if first.UpstreamBlobBytes == 0 {
		return fmt.Errorf("the first node %s took no blob bytes from the upstream: the workload image was already somewhere", first.Node)
	}
	for _, p := range ps[1:] {
		if p.UpstreamBlobBytes != 0 {
			return fmt.Errorf("%s pulled %d blob bytes from the upstream although %s held every layer: peers were not used", p.Node, p.UpstreamBlobBytes, first.Node)
		}
		if p.PeerBytes < s.opts.WorkloadSize*9/10 {
			return fmt.Errorf("%s fetched %d bytes from peers, want the whole image (~%d)", p.Node, p.PeerBytes, s.opts.WorkloadSize)
		}
		if p.Took >= first.Took {
			return fmt.Errorf("%s pulled from peers in %v, no faster than %s from the upstream in %v", p.Node, p.Took, first.Node, first.Took)
		}
	}
	s.say("  later nodes took 0 bytes from the upstream; the first node took %s.", mb(first.UpstreamBlobBytes))
	return nil
}

// faultAgentPod updates the workload to a new image and, once the first
// node has pulled it, deletes that node's agent pod: the rest of the
// rollout must still end with every pod running (other peers or the
// upstream serve what the dead agent would have).
func (s *scenario) faultAgentPod(ctx context.Context) error {
	ref, err := s.pushWorkload(ctx, 2, "v2")
	if err != nil {
		return err
	}
	n := len(s.c.Nodes)
	s.say("Updating %s to %s, one node at a time; once the first node has it, its agent pod is deleted.", workloadName, ref)
	base := s.snapshot(ctx)
	t0 := time.Now()
	if err := s.setImage(ctx, ref); err != nil {
		return err
	}
	var victim string
	err = s.c.Poll(ctx, 3*time.Minute, func(ctx context.Context) (bool, string, error) {
		pods, err := s.workloadPods(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		for _, p := range pods {
			if p.Spec.Containers[0].Image == ref && p.Status.Phase == corev1.PodRunning {
				victim = p.Spec.NodeName
				return true, "", nil
			}
		}
		return false, "no pod of the new image running yet", nil
	})
	if err != nil {
		return err
	}
	agent, err := s.podOn(ctx, Namespace, "app.kubernetes.io/component=agent", victim)
	if err != nil {
		return err
	}
	if err := s.c.Client.CoreV1().Pods(Namespace).Delete(ctx, agent.Name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	s.say("  deleted agent pod %s on %s, which holds the new image, %v into the update", agent.Name, victim, time.Since(t0).Round(100*time.Millisecond))
	if err := s.waitRollout(ctx, ref, n, 5*time.Minute); err != nil {
		return err
	}
	s.rep.time("update with agent pod deleted", time.Since(t0))
	if _, err := s.collectPulls(ctx, "agent-pod-deleted", ref, base); err != nil {
		return err
	}
	if err := s.waitSpegelReady(ctx, n, 2*time.Minute); err != nil {
		return fmt.Errorf("after the agent pod was deleted: %w", err)
	}
	s.say("  update done in %v: %d pods of %s running; the agent on %s is back and the Spegel resource is Ready again", s.rep.Timings["update with agent pod deleted"].Round(100*time.Millisecond), n, "v2", victim)
	return s.checkPeerHits(ctx, n)
}

// checkPeerHits waits for the operator (a pod on the pod network) to have
// scraped every agent (host network, other nodes) into status.peerHits,
// the ratio `kubectl get spegel -o wide` shows.
func (s *scenario) checkPeerHits(ctx context.Context, nodes int) error {
	want := fmt.Sprintf("%d/%d", nodes, nodes)
	var hits map[string]any
	err := s.c.Poll(ctx, 2*time.Minute, func(ctx context.Context) (bool, string, error) {
		obj, err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		hits, _, _ = unstructured.NestedMap(obj.Object, "status", "peerHits")
		return hits["agents"] == want && hits["ratio"] != nil, fmt.Sprintf("status.peerHits = %v, want agents %s and a ratio", hits, want), nil
	})
	if err != nil {
		return err
	}
	s.rep.PeerHits = fmt.Sprint(hits["ratio"])
	s.say("  the operator scraped all %s agents: peer hit ratio %v over %v requests in the last %v (status.peerHits)", want, hits["ratio"], hits["requests"], hits["window"])
	return nil
}

// faultFreshNode joins a node (its addon pods start and prep prepares it),
// stops the upstream, and schedules the workload there: every layer must
// come from peers, the tag resolved through them too.
func (s *scenario) faultFreshNode(ctx context.Context) error {
	t0 := time.Now()
	k, err := s.joinWithOperatorDown(ctx)
	if err != nil {
		return err
	}
	n := len(s.c.Nodes)
	if err := s.waitSpegelReady(ctx, n, 3*time.Minute); err != nil {
		return err
	}
	s.rep.time("fresh node agents ready", time.Since(t0))
	if err := s.checkMarkedReady(ctx, k.Name); err != nil {
		return err
	}
	if err := s.checkPrepped(ctx, n-1, k.Node); err != nil {
		return err
	}
	s.say("  %s Ready in %v; its agent ready %v after it joined", k.Name, s.rep.Timings["fresh node to Ready"].Round(100*time.Millisecond), s.rep.Timings["fresh node agents ready"].Round(100*time.Millisecond))

	s.say("Stopping the upstream registry, then scaling %s to %d so a pod lands on %s.", workloadName, n, k.Name)
	if err := s.c.Upstream.Stop(); err != nil {
		return err
	}
	defer func() { _ = s.c.Upstream.Start() }()
	base := s.snapshot(ctx)
	t1 := time.Now()
	if err := s.scale(ctx, int32(n)); err != nil {
		return err
	}
	dep, err := s.c.Client.AppsV1().Deployments(workloadNS).Get(ctx, workloadName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	ref := dep.Spec.Template.Spec.Containers[0].Image
	if err := s.waitRollout(ctx, ref, n, 3*time.Minute); err != nil {
		return err
	}
	s.rep.time("fresh node pod running", time.Since(t1))
	ps, err := s.collectPulls(ctx, "fresh-node", ref, base)
	if err != nil {
		return err
	}
	var mine *Pull
	for i := range ps {
		if ps[i].Node == k.Name {
			mine = &ps[i]
		}
	}
	if mine == nil {
		return fmt.Errorf("no pull of %s on the fresh node %s (pulls: %+v)", ref, k.Name, ps)
	}
	if mine.PeerBytes < s.opts.WorkloadSize*9/10 {
		return fmt.Errorf("%s fetched %d bytes from peers with the upstream down, want the whole image (~%d)", k.Name, mine.PeerBytes, s.opts.WorkloadSize)
	}
	s.say("  the pod on %s runs: %s from peers in %v with the upstream down", k.Name, mb(mine.PeerBytes), mine.Took.Round(time.Millisecond))
	s.measureMemory(ctx, "addon and workload, "+fmt.Sprint(n)+" nodes")
	return s.c.Upstream.Start()
}

// baseline rolls out a new image of the same size the same way with the
// addon gone: every node pulls from the upstream.
func (s *scenario) baseline(ctx context.Context) error {
	if err := s.c.Client.AppsV1().Deployments(workloadNS).Delete(ctx, workloadName, metav1.DeleteOptions{}); err != nil {
		return err
	}
	err := s.c.Poll(ctx, 2*time.Minute, func(ctx context.Context) (bool, string, error) {
		pods, err := s.workloadPods(ctx)
		return err == nil && len(pods) == 0, fmt.Sprintf("%d workload pods left (%v)", len(pods), err), nil
	})
	if err != nil {
		return err
	}
	ref, err := s.pushWorkload(ctx, 3, "v3")
	if err != nil {
		return err
	}
	n := s.opts.Nodes // as many nodes as the rollout with the addon
	s.say("Without the addon: the same rollout (one replica, then %d) of an image of the same size that no node holds.", n)
	ps, took, err := s.scaleAndMeasure(ctx, "baseline", ref, n)
	if err != nil {
		return err
	}
	s.rep.time("rollout without addon", took)
	for _, p := range ps {
		if p.UpstreamBlobBytes < s.opts.WorkloadSize*9/10 {
			return fmt.Errorf("%s took only %d blob bytes from the upstream without the addon, want the whole image", p.Node, p.UpstreamBlobBytes)
		}
	}
	return s.c.Client.AppsV1().Deployments(workloadNS).Delete(ctx, workloadName, metav1.DeleteOptions{})
}

// scaleAndMeasure creates the workload Deployment of ref with one
// replica, waits for it, scales to `to`, and returns every node's pull in
// rollout order and the scale-up's wall time.
func (s *scenario) scaleAndMeasure(ctx context.Context, phase, ref string, to int) ([]Pull, time.Duration, error) {
	const from = 1
	base := s.snapshot(ctx)
	if _, err := s.c.Client.AppsV1().Deployments(workloadNS).Create(ctx, workloadDeployment(ref, from), metav1.CreateOptions{}); err != nil {
		return nil, 0, err
	}
	if err := s.waitRollout(ctx, ref, from, 4*time.Minute); err != nil {
		return nil, 0, err
	}
	first, err := s.collectPulls(ctx, phase, ref, base)
	if err != nil {
		return nil, 0, err
	}
	base = s.snapshot(ctx)
	t0 := time.Now()
	if err := s.scale(ctx, int32(to)); err != nil {
		return nil, 0, err
	}
	if err := s.waitRollout(ctx, ref, to, 4*time.Minute); err != nil {
		return nil, 0, err
	}
	took := time.Since(t0)
	rest, err := s.collectPulls(ctx, phase, ref, base)
	if err != nil {
		return nil, 0, err
	}
	ps := append(first, rest...)
	if len(ps) != to {
		return nil, 0, fmt.Errorf("%d pulls of %s reported, want one per node (%d): %+v", len(ps), ref, to, ps)
	}
	for _, p := range ps {
		s.say("  %d. %-3s pulled in %6.2fs: %8s from the upstream, %8s from peers", p.Order, p.Node, p.Took.Seconds(), mb(p.UpstreamBlobBytes), mb(p.PeerBytes))
	}
	s.say("  scaling from %d to %d took %v", from, to, took.Round(100*time.Millisecond))
	return ps, took, nil
}

// counters is the upstream's and the agents' byte counters, and the
// workload pods, at one moment.
type counters struct {
	upstream cluster.UpstreamStats
	peer     map[string]int64
	pods     map[types.UID]bool
}

func (s *scenario) snapshot(ctx context.Context) counters {
	c := counters{upstream: s.c.Upstream.Stats(), peer: map[string]int64{}, pods: map[types.UID]bool{}}
	for _, n := range s.c.Nodes {
		c.peer[n.Name] = s.peerBytes(ctx, n)
	}
	pods, _ := s.workloadPods(ctx)
	for _, p := range pods {
		c.pods[p.UID] = true
	}
	return c
}

// since is what node n's agent fetched from peers after base; a counter
// lower than at base belongs to a new agent pod, which counted from 0.
func (c counters) since(base counters, node string) int64 {
	if c.peer[node] < base.peer[node] {
		return c.peer[node]
	}
	return c.peer[node] - base.peer[node]
}

// peerBytes is what node n's agent fetched from peers so far (0 without a
// running agent).
func (s *scenario) peerBytes(ctx context.Context, n *cluster.Node) int64 {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+netip.AddrPortFrom(n.IP, agentPort).String()+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	m, err := cluster.ParseMetrics(resp.Body)
	if err != nil {
		return 0
	}
	return int64(m.Sum("fleetmirror_peer_fetched_bytes_total"))
}

// collectPulls reads the kubelet's Pulled events of ref's pods made since
// base, with each node's bytes since base.
func (s *scenario) collectPulls(ctx context.Context, phase, ref string, base counters) ([]Pull, error) {
	now := s.snapshot(ctx)
	pods, err := s.workloadPods(ctx)
	if err != nil {
		return nil, err
	}
	var ps []Pull
	created := map[string]time.Time{}
	for _, p := range pods {
		if p.Spec.Containers[0].Image != ref || base.pods[p.UID] {
			continue
		}
		created[p.Spec.NodeName] = p.CreationTimestamp.Time
		took, err := s.pullTime(ctx, p)
		if err != nil {
			return nil, err
		}
		n := s.node(p.Spec.NodeName)
		if n == nil {
			return nil, fmt.Errorf("pod %s on unknown node %q", p.Name, p.Spec.NodeName)
		}
		ps = append(ps, Pull{
			Phase: phase, Node: n.Name, Image: ref, Took: took,
			UpstreamBlobBytes: now.upstream.FromClient(n.IP, "GET", "blob").Bytes - base.upstream.FromClient(n.IP, "GET", "blob").Bytes,
			PeerBytes:         now.since(base, n.Name),
		})
	}
	// In the order the pods were made (a second apart at best), then by
	// node name.
	sort.SliceStable(ps, func(i, j int) bool {
		if !created[ps[i].Node].Equal(created[ps[j].Node]) {
			return created[ps[i].Node].Before(created[ps[j].Node])
		}
		return ps[i].Node < ps[j].Node
	})
	done := len(s.rep.PullsOf(phase))
	for i := range ps {
		ps[i].Order = done + i + 1
	}
	s.rep.Pulls = append(s.rep.Pulls, ps...)
	return ps, nil
}

func (s *scenario) node(name string) *cluster.Node {
	for _, n := range s.c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// pulledRE reads the kubelet's event: `Successfully pulled image "x" in
// 1.234s (1.234s including waiting). Image size: ...`.
var pulledRE = regexp.MustCompile(`Successfully pulled image "[^"]+" in ([0-9.]+[a-zµ]+)`)

// pullTime is how long the kubelet said pod p's image pull took.
func (s *scenario) pullTime(ctx context.Context, p corev1.Pod) (time.Duration, error) {
	var took time.Duration
	err := s.c.Poll(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		evs, err := s.c.Client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.uid=" + string(p.UID) + ",reason=Pulled",
		})
		if err != nil {
			return false, err.Error(), nil
		}
		for _, e := range evs.Items {
			if m := pulledRE.FindStringSubmatch(e.Message); m != nil {
				d, err := time.ParseDuration(m[1])
				if err != nil {
					return false, "", fmt.Errorf("pod %s: event %q: %w", p.Name, e.Message, err)
				}
				took = d
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("no \"Successfully pulled\" event for pod %s on %s yet", p.Name, p.Spec.NodeName), nil
	})
	return took, err
}

// pushWorkload pushes a generated image (seeded, so nobody holds its
// layers) to the upstream as fleetmirror/workload:<tag>.
func (s *scenario) pushWorkload(ctx context.Context, seed int64, tag string) (string, error) {
	img, err := s.c.Workload(seed, s.opts.WorkloadSize, s.opts.WorkloadLayers)
	if err != nil {
		return "", err
	}
	ref := s.c.Upstream.Ref("fleetmirror/workload:" + tag)
	// Pushed unshaped: the shaping is for what nodes pull.
	s.c.Upstream.SetShaping(0, 0)
	defer s.c.Upstream.SetShaping(s.opts.UpstreamRate, s.opts.UpstreamLatency)
	if err := s.c.Upstream.Push(ctx, ref, img); err != nil {
		return "", err
	}
	s.rep.Workload = fmt.Sprintf("%s, %s in %d layers", ref, mb(s.opts.WorkloadSize), s.opts.WorkloadLayers)
	return ref, nil
}

// workloadDeployment runs the sleeper image ref, one pod per node.
func workloadDeployment(ref string, replicas int32) *appsv1.Deployment {
	labels := map[string]string{"app": workloadName}
	zero := intOrString(0)
	one := intOrString(1)
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: workloadName, Namespace: workloadNS},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			// One node at a time, as a cautious rolling update does.
			Strategy: appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDeployment{MaxSurge: &zero, MaxUnavailable: &one}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: new(int64),
					Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
						RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
							LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
							TopologyKey:   corev1.LabelHostname,
						}},
					}},
					Containers: []corev1.Container{{
						Name:            "app",
						Image:           ref,
						ImagePullPolicy: corev1.PullIfNotPresent,
						Env: []corev1.EnvVar{{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{
							FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"},
						}}},
					}},
				},
			},
		},
	}
}

func (s *scenario) scale(ctx context.Context, replicas int32) error {
	patch := fmt.Sprintf(`{"spec":{"replicas":%d}}`, replicas)
	_, err := s.c.Client.AppsV1().Deployments(workloadNS).Patch(ctx, workloadName, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	return err
}

func (s *scenario) setImage(ctx context.Context, ref string) error {
	patch := fmt.Sprintf(`{"spec":{"template":{"spec":{"containers":[{"name":"app","image":%q}]}}}}`, ref)
	_, err := s.c.Client.AppsV1().Deployments(workloadNS).Patch(ctx, workloadName, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	return err
}

func (s *scenario) workloadPods(ctx context.Context) ([]corev1.Pod, error) {
	pods, err := s.c.Client.CoreV1().Pods(workloadNS).List(ctx, metav1.ListOptions{LabelSelector: "app=" + workloadName})
	if err != nil {
		return nil, err
	}
	var live []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			live = append(live, p)
		}
	}
	return live, nil
}

// waitRollout waits until exactly want pods of ref run, on distinct
// nodes, and no pod of another image is left.
func (s *scenario) waitRollout(ctx context.Context, ref string, want int, timeout time.Duration) error {
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		pods, err := s.workloadPods(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		running := 0
		var st []string
		for _, p := range pods {
			state := string(p.Status.Phase)
			for _, cs := range p.Status.ContainerStatuses {
				if w := cs.State.Waiting; w != nil {
					state += "/" + w.Reason + ": " + w.Message
				}
			}
			st = append(st, fmt.Sprintf("%s on %s: %s %s", p.Name, p.Spec.NodeName, p.Spec.Containers[0].Image, state))
			if p.Spec.Containers[0].Image == ref && p.Status.Phase == corev1.PodRunning {
				running++
			}
		}
		return running == want && len(pods) == want, fmt.Sprintf("%d/%d running: %s", running, want, strings.Join(st, "; ")), nil
	})
}

// checkMarkedReady checks node readiness's end for a node its agent
// released while the operator was down: once the operator is back and the
// agent ready, the operator marks the node ready once (so it is never held
// again), and the agent's release record stays.
func (s *scenario) checkMarkedReady(ctx context.Context, name string) error {
	return s.c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		n, err := s.c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		ready, released := n.Annotations[readiness.ReadyAnnotation], n.Annotations[nodetaint.ReleasedAnnotation]
		if ready == "" || released == "" || hasTaint(n, readiness.TaintKey) {
			return false, fmt.Sprintf("%s: %s=%q, %s=%q, startup taint %v; want both annotations and no taint",
				name, readiness.ReadyAnnotation, ready, nodetaint.ReleasedAnnotation, released, hasTaint(n, readiness.TaintKey)), nil
		}
		return true, "", nil
	})
}
