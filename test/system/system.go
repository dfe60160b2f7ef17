// Package system runs fleetmirror the way a platform team does, on a real
// local Kubernetes cluster (test/kube), and checks every step: `helm
// install` of the operator chart with a provider override and imageMirror,
// the operator rendering the addon, containerd-prep patching and restarting
// each node's containerd, a large workload rolled out node by node with
// later nodes pulling from peers, faults (an agent pod deleted
// mid-rollout, a dead upstream with a fresh node), the uninstall, and the
// same rollout without the addon for comparison.
//
// Run is both the end-to-end test's body (system_test.go asserts on its
// error and Report) and `make demo`'s script (test/demo narrates it).
//
// The one registry of the cluster (test/cluster's upstream, in a network
// namespace of its own) plays both the upstream the workloads come from
// and the customer's mirror that imageMirror points at: our images are
// built from this tree (cmd/images, as `make images PUSH=...` does) and
// pushed there under <registry>/mirror/ghcr.io/fleetmirror/...; nothing
// comes from the internet.
package system

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"

	"github.com/fleetmirror/fleetmirror/operator/crd"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
	"github.com/fleetmirror/fleetmirror/release/version"
	"github.com/fleetmirror/fleetmirror/test/cluster"
	"github.com/fleetmirror/fleetmirror/test/kube"
)

// HelmVersion is the helm that hack/tools.sh builds.
const HelmVersion = "v3.22.0"

// Names the scenario uses, as a platform team following the README would.
const (
	Release   = "fleetmirror"
	Namespace = "fleetmirror-system"
	// Spegel is the default resource the operator chart creates.
	Spegel = "fleetmirror-spegel"
	// MirrorPrefix is imageMirror's path in the registry.
	MirrorPrefix = "mirror"
	workloadNS   = "default"
	workloadName = "workload"
	agentPort    = 30122 // the chart's metrics port
)

// SpegelResource is the Spegel CRD's resource.
var SpegelResource = crd.Resource

// Options configures Run. Zero values take the defaults.
type Options struct {
	Nodes          int   // worker nodes at start, >= 2; default 3 (a 4th joins in the fresh-node fault)
	WorkloadSize   int64 // bytes of the workload image; default 240 MB
	WorkloadLayers int   // default 4
	// The upstream's link, shared by every node: default 40 MB/s with
	// 20 ms before each response, a registry across a WAN. Peers are not
	// shaped.
	UpstreamRate    int64
	UpstreamLatency time.Duration
	Module          string // repository root; default: found from the working dir
	// Say narrates the steps (the demo prints it; tests log it).
	Say func(format string, args ...any)
	// Logf gets the harness's own logs.
	Logf func(format string, args ...any)
}

// Pull is one node's pull of a workload image, as the kubelet reported it.
type Pull struct {
	Phase string // "rollout", "agent-pod-deleted", "fresh-node", "baseline"
	Node  string
	Image string
	Took  time.Duration // kubelet's "Successfully pulled image ... in"
	// UpstreamBlobBytes came from the upstream to this node during the
	// phase; PeerBytes from peers (the node's agent's metrics).
	UpstreamBlobBytes int64
	PeerBytes         int64
	// Order is the pod's place in the rollout, 1 = first.
	Order int
}

// Report is what Run measured.
type Report struct {
	// Wall times: "cluster start", "images build and push", "install to
	// agents ready", "rollout with addon" (scale 1 -> Nodes),
	// "update with agent pod deleted", "fresh node to Ready", "fresh node
	// agents ready", "fresh node pod running", "uninstall",
	// "rollout without addon", "reinstall to agents ready", "helm
	// uninstall alone".
	Timings map[string]time.Duration
	// Order of Timings' keys as they happened.
	Steps        []string
	Pulls        []Pull
	PrepRestarts map[string]int // per node, containerd restarts by prep
	// Memory: RSS of every process of the cluster (control plane,
	// kubelets, containerds, shims, pods), at points of the scenario.
	Memory     map[string]int64
	MemorySeen []string
	// MemoryByCommand is, for each of MemorySeen, "name MiB, ..." by
	// process name, largest first.
	MemoryByCommand []string
	Workload        string // the workload image's reference and size
	PeerHits        string // status.peerHits.ratio after the update
	// Latencies of the mirror path proof: how long a broken or fixed
	// node setup took to show, and when held nodes were released.
	Latencies []string
}

func (r *Report) time(step string, d time.Duration) {
	r.Timings[step] = d
	r.Steps = append(r.Steps, step)
}

// PullsOf returns the pulls of one phase in rollout order.
func (r *Report) PullsOf(phase string) []Pull {
	var ps []Pull
	for _, p := range r.Pulls {
		if p.Phase == phase {
			ps = append(ps, p)
		}
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].Order < ps[j].Order })
	return ps
}

type scenario struct {
	opts    Options
	say     func(string, ...any)
	c       *kube.Cluster
	dyn     dynamic.Interface
	helm    string
	home    string // helm's config and cache
	rep     *Report
	mirror  string // imageMirror
	version string // the release's version (VERSION), of the charts pushed to the mirror
	// hostsBefore is each node's certs.d before the install.
	hostsBefore map[string]map[string]string
}

// Run runs the whole scenario on a cluster of its own and removes it
// again. Every step checks what a user would check; the first failure ends
// the run with an error naming the step (with log tails). The Report holds
// what was measured up to there.
func Run(ctx context.Context, opts Options) (rep *Report, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.Nodes < 2 {
		return nil, fmt.Errorf("system: Nodes must be >= 2 (a peer needs a peer), got %d", opts.Nodes)
	}
	if opts.WorkloadSize == 0 {
		opts.WorkloadSize = 240 << 20
	}
	if opts.WorkloadLayers == 0 {
		opts.WorkloadLayers = 4
	}
	if opts.UpstreamRate == 0 {
		opts.UpstreamRate = 40 << 20
	}
	if opts.UpstreamLatency == 0 {
		opts.UpstreamLatency = 20 * time.Millisecond
	}
	if opts.Say == nil {
		opts.Say = func(string, ...any) {}
	}
	if opts.Module == "" {
		if opts.Module, err = moduleRoot(); err != nil {
			return nil, err
		}
	}
	s := &scenario{opts: opts, say: opts.Say, rep: &Report{
		Timings: map[string]time.Duration{}, PrepRestarts: map[string]int{}, Memory: map[string]int64{},
	}}
	if s.helm, err = helmBinary(); err != nil {
		return nil, err
	}
	if s.home, err = os.MkdirTemp("", "fmsystem-helm-"); err != nil {
		return nil, err
	}
	defer os.RemoveAll(s.home)

	steps := []struct {
		name string
		f    func(context.Context) error
	}{
		{"start the cluster", s.start},
		{"release: our images and charts to the mirror", s.pushImages},
		{"helm install the operator", s.install},
		{"the operator's rights and the network key", s.checkLeastPrivilege},
		{"prep ran once per node", s.checkPrep},
		{"every node proves its mirror path", s.checkMirrorPath},
		{"broken node configs: config_path removed, discard_unpacked_layers = true, config_path a list", s.faultConfigs},
		{"broken: a mirrored registry's hosts.toml deleted with containerdMirrorAdd false", s.faultHostsDeleted},
		{"broken: the mirror target where nothing listens", s.faultMirrorTarget},
		{"roll out the workload", s.rollout},
		{"delete an agent pod mid-rollout", s.faultAgentPod},
		{"fresh node while the operator is scaled to zero, then the upstream down", s.faultFreshNode},
		{"a node whose agent never gets ready", s.faultNeverReady},
		{"uninstall", s.uninstall},
		{"the rollout without the addon", s.baseline},
		{"migrate from a Spegel install, then helm uninstall alone", s.reinstall},
	}
	defer func() {
		if s.c == nil {
			return
		}
		if err != nil {
			err = fmt.Errorf("%w\npod logs:\n%s\nlogs:\n%s", err, s.podLogs(context.WithoutCancel(ctx), Namespace, 25), s.c.LogTail(20))
		}
		if cerr := s.c.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close the cluster: %w", cerr))
		}
	}()
	for _, st := range steps {
		if err := st.f(ctx); err != nil {
			return s.rep, fmt.Errorf("%s: %w", st.name, err)
		}
	}
	return s.rep, nil
}

// start brings up the cluster: nodes whose containerd config lacks what
// prep sets, each with its own mounts and system bus.
func (s *scenario) start(ctx context.Context) error {
	s.say("Starting a Kubernetes %s cluster: control plane and %d worker nodes, each with its own containerd 2.x whose config lacks config_path and sets discard_unpacked_layers = true, as many managed node images ship it.",
		kube.KubeVersion, s.opts.Nodes)
	t0 := time.Now()
	c, err := kube.Start(ctx, kube.Options{Nodes: s.opts.Nodes, PrivateMounts: true, Unprepared: true, Logf: s.opts.Logf})
	if err != nil {
		return err
	}
	s.c = c
	s.rep.time("cluster start", time.Since(t0))
	if s.dyn, err = dynamic.NewForConfig(c.Config); err != nil {
		return err
	}
	s.mirror = c.Upstream.Host() + "/" + MirrorPrefix
	s.say("  cluster up in %v; registry (upstream and mirror) at %s; kubeconfig %s", s.rep.Timings["cluster start"].Round(100*time.Millisecond), c.Upstream.URL(), c.Kubeconfig)
	s.measureMemory(ctx, "idle, "+fmt.Sprint(len(c.Nodes))+" nodes")
	s.hostsBefore = map[string]map[string]string{}
	for _, n := range c.Nodes {
		if s.hostsBefore[n.Name], err = readCertsDir(n.CertsDir); err != nil {
			return err
		}
	}
	return nil
}

// pushImages is `make release` into the test cluster's mirror: the agent
// and operator images built from this tree with cmd/images and pushed to
// the mirror path, then both charts packaged as VERSION, the operator
// chart's images pinned by those digests, and pushed to
// oci://<mirror>/helm-charts (hack/release-charts.sh, as `make release`
// runs it). Only the platform of this machine is built, and the images map
// in the tree is left alone.
func (s *scenario) pushImages(ctx context.Context) error {
	v, err := version.Read(s.opts.Module)
	if err != nil {
		return err
	}
	s.version = v
	s.say("Releasing %s into the mirror as `make release REGISTRY=%s` does: building the agent and operator images (cmd/images) and pushing them, then the charts.", v, s.mirror)
	t0 := time.Now()
	out := filepath.Join(s.c.Dir, "images")
	refs := filepath.Join(s.c.Dir, "refs")
	cmd := exec.CommandContext(ctx, "go", "run", "./cmd/images", "--images", "agent,operator", "--version", v,
		"--out", out, "--push", s.mirror, "--refs", refs)
	cmd.Dir = s.opts.Module
	cmd.Env = append(os.Environ(), "GOFLAGS=-buildvcs=false")
	b, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go run ./cmd/images: %w\n%s", err, b)
	}
	s.rep.time("images build and push", time.Since(t0))
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.Contains(line, " pushed ") {
			s.say("  %s", line)
		}
	}
	cmd = exec.CommandContext(ctx, "bash", filepath.Join("hack", "release-charts.sh"), v, refs, s.mirror, filepath.Join(s.c.Dir, "release"))
	cmd.Dir = s.opts.Module
	cmd.Env = append(os.Environ(), "HELM="+s.helm, "PLAIN_HTTP=1",
		"HELM_CONFIG_HOME="+filepath.Join(s.home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(s.home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(s.home, "data"))
	if b, err = cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("hack/release-charts.sh: %w\n%s", err, b)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.HasPrefix(line, "Pushed: ") {
			s.say("  chart %s", strings.TrimPrefix(line, "Pushed: "))
		}
	}
	return nil
}

// install is the README's install: helm install with the provider
// override and imageMirror, then wait for the resource's status.
func (s *scenario) install(ctx context.Context) error {
	n := len(s.c.Nodes)
	args := s.installArgs()
	s.say("Installing: helm %s", strings.Join(args, " "))
	t0 := time.Now()
	if out, err := s.runHelm(ctx, args...); err != nil {
		return err
	} else {
		s.say("  %s", firstLines(out, 4))
	}
	s.say("  operator running after %v; waiting for the Spegel resource to report %d nodes ready", time.Since(t0).Round(100*time.Millisecond), n)
	if err := s.waitSpegelReady(ctx, n, 4*time.Minute); err != nil {
		return err
	}
	s.rep.time("install to agents ready", time.Since(t0))
	out, _ := s.kubectlGetSpegel(ctx)
	s.say("  all agents ready %v after helm install:\n%s", s.rep.Timings["install to agents ready"].Round(100*time.Millisecond), indent(out))
	s.measureMemory(ctx, "addon installed, "+fmt.Sprint(n)+" nodes")
	return nil
}

// installArgs is the README's helm install from the release's OCI chart,
// pointed at the local mirror.
func (s *scenario) installArgs() []string {
	return []string{"install", Release, "oci://" + s.mirror + "/helm-charts/fleetmirror-operator",
		"--version", s.version, "--plain-http",
		"--namespace", Namespace, "--create-namespace",
		"-f", filepath.Join(s.opts.Module, "overrides", "nebius.yaml"),
		"--set", "imageMirror=" + s.mirror,
		"--set", "components.spegel.mirroredRegistries={" + s.c.Upstream.URL() + "}",
		// Node readiness on, and every check period and bound short, so
		// the mirror path proof's transitions show within seconds.
		"--set", "nodeReadiness.enabled=true",
		"--set", "nodeReadiness.releaseAfter=" + releaseAfter.String(),
		"--set", "mirrorPathPeriod=" + mirrorPathPeriod.String(),
		"--set", "components.spegel.canaryInterval=" + canaryInterval.String(),
		"--set", "components.spegel.releaseTaintAfter=" + releaseTaintAfter.String(),
		"--wait", "--timeout", "3m"}
}

// checkPrep checks that prep patched every node's config.toml and
// restarted its containerd exactly once, and that a second run (its pod
// deleted and recreated) changes nothing and restarts nothing.
func (s *scenario) checkPrep(ctx context.Context) error {
	for i, n := range s.c.Nodes {
		if err := s.checkPrepped(ctx, i, n); err != nil {
			return err
		}
	}
	n := s.c.Nodes[0]
	pod, err := s.podOn(ctx, Namespace, "app.kubernetes.io/component=containerd-prep", n.Name)
	if err != nil {
		return err
	}
	s.say("Deleting %s's containerd-prep pod: its replacement must find nothing to change and restart nothing.", n.Name)
	if err := s.c.Client.CoreV1().Pods(Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	if err := s.waitPodReplaced(ctx, Namespace, "app.kubernetes.io/component=containerd-prep", n.Name, pod.UID, 2*time.Minute); err != nil {
		return err
	}
	if got := s.c.Buses[0].Systemd.Restarts(kube.ContainerdUnit); got != 1 {
		return fmt.Errorf("%s: containerd restarted %d times after prep ran again on an already prepared node, want still 1", n.Name, got)
	}
	s.say("  second prep run on %s: no change, no restart", n.Name)
	return nil
}

// checkPrepped checks node i's config.toml and restart count.
func (s *scenario) checkPrepped(ctx context.Context, i int, n *cluster.Node) error {
	b, err := os.ReadFile(n.ConfigPath)
	if err != nil {
		return err
	}
	cfg := string(b)
	for _, want := range []string{`config_path = "/etc/containerd/certs.d"`, "discard_unpacked_layers = false"} {
		if !strings.Contains(cfg, want) {
			return fmt.Errorf("%s: config.toml lacks %s after prep:\n%s", n.Name, want, cfg)
		}
	}
	restarts := s.c.Buses[i].Systemd.Restarts(kube.ContainerdUnit)
	if restarts != 1 {
		return fmt.Errorf("%s: prep restarted containerd %d times, want once", n.Name, restarts)
	}
	s.rep.PrepRestarts[n.Name] = restarts
	s.say("  %s: config.toml patched (config_path, discard_unpacked_layers = false), containerd restarted once", n.Name)
	return nil
}

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

// uninstall deletes the Spegel resource (the DaemonSets go, and each
// node's mirror configuration is restored), then helm uninstalls the
// operator: nothing of ours may remain.
func (s *scenario) uninstall(ctx context.Context) error {
	s.say("Uninstalling: deleting the Spegel resource, then `helm uninstall %s`.", Release)
	t0 := time.Now()
	if err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Delete(ctx, Spegel, metav1.DeleteOptions{}); err != nil {
		return err
	}
	err := s.c.Poll(ctx, 3*time.Minute, func(ctx context.Context) (bool, string, error) {
		_, err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, "", nil
		}
		return false, fmt.Sprintf("Spegel %s/%s still there (%v)", Namespace, Spegel, err), nil
	})
	if err != nil {
		return err
	}
	if err := s.checkNodesRestored(ctx); err != nil {
		return err
	}
	s.say("  DaemonSets gone; every node's certs.d is back to what it had before the install, and no node carries the %s condition", mirrorpath.ConditionType)
	// Every agent stopped, each finishing a run in progress: whatever of
	// the canary any run of the scenario left would be here now.
	if err := s.checkNoCanaryLeft(ctx, 5*time.Second); err != nil {
		return err
	}
	if err := s.checkNoCanaryUpstream(); err != nil {
		return err
	}
	s.say("  after every canary of the scenario, broken nodes' included: no canary image or content on any node, and no canary request in the upstream's log")
	if _, err := s.runHelm(ctx, "uninstall", Release, "--namespace", Namespace, "--wait", "--timeout", "3m"); err != nil {
		return err
	}
	if err := s.checkNothingLeft(ctx); err != nil {
		return err
	}
	s.rep.time("uninstall", time.Since(t0))
	s.say("  uninstalled in %v; nothing of the operator or the addon is left (the CRD stays, as Helm never deletes CRDs)", s.rep.Timings["uninstall"].Round(100*time.Millisecond))
	return nil
}

// checkNodesRestored checks that the addon's DaemonSets are gone and every
// node's certs.d is what it was before the install.
func (s *scenario) checkNodesRestored(ctx context.Context) error {
	dss, err := s.c.Client.AppsV1().DaemonSets(Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	if len(dss.Items) > 0 {
		return fmt.Errorf("DaemonSets left after the Spegel resource went: %s", names(dss.Items))
	}
	for _, n := range s.c.Nodes {
		got, err := readCertsDir(n.CertsDir)
		if err != nil {
			return err
		}
		want, ok := s.hostsBefore[n.Name]
		if !ok { // the fresh node: what it joined with
			want = map[string]string{s.c.Upstream.Host() + "/hosts.toml": cluster.UpstreamHostsTOML(s.c.Upstream)}
		}
		if !maps.Equal(got, want) {
			return fmt.Errorf("%s: certs.d after uninstall = %v, want it restored to %v", n.Name, got, want)
		}
	}
	// The mirror path condition goes with the resource: no node may keep
	// saying its path is proven once nothing mirrors.
	return s.c.Poll(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		nodes, err := s.c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, "", err
		}
		for _, n := range nodes.Items {
			for _, c := range n.Status.Conditions {
				if c.Type == mirrorpath.ConditionType {
					return false, fmt.Sprintf("%s still has the %s condition (%s)", n.Name, c.Type, c.Status), nil
				}
			}
		}
		return true, "", nil
	})
}

// reinstall installs again on the nodes prep already prepared (no
// containerd may restart) and removes it with nothing but `helm
// uninstall`: the operator chart's pre-delete hook must remove the Spegel
// resource, and with it the addon, before the operator goes.
func (s *scenario) reinstall(ctx context.Context) error {
	n := len(s.c.Nodes)
	s.say("Installing again on the %d prepared nodes, migrating from a Spegel install as the operator README says, then removing ours with `helm uninstall` alone.", n)
	if err := s.migrate(ctx); err != nil {
		return err
	}
	t1 := time.Now()
	if out, err := s.runHelm(ctx, "uninstall", Release, "--namespace", Namespace, "--wait", "--timeout", "5m"); err != nil {
		return err
	} else {
		s.say("  %s", firstLines(out, 2))
	}
	if err := s.checkNodesRestored(ctx); err != nil {
		return err
	}
	if err := s.checkNothingLeft(ctx); err != nil {
		return err
	}
	s.rep.time("helm uninstall alone", time.Since(t1))
	s.say("  helm uninstall took %v: its pre-delete hook removed the Spegel resource, the operator restored every node's certs.d, and nothing is left", s.rep.Timings["helm uninstall alone"].Round(100*time.Millisecond))
	return nil
}

// checkNothingLeft lists what the operator and the addon could have made.
func (s *scenario) checkNothingLeft(ctx context.Context) error {
	cs := s.c.Client
	var left []string
	return s.c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		left = left[:0]
		add := func(kind string, names []string, err error) {
			if err != nil {
				left = append(left, kind+": "+err.Error())
			}
			for _, n := range names {
				left = append(left, kind+"/"+n)
			}
		}
		l := metav1.ListOptions{}
		pods, err := cs.CoreV1().Pods(Namespace).List(ctx, l)
		add("pod", listNames(pods, err), err)
		deps, err := cs.AppsV1().Deployments(Namespace).List(ctx, l)
		add("deployment", listNames(deps, err), err)
		dss, err := cs.AppsV1().DaemonSets(Namespace).List(ctx, l)
		add("daemonset", listNames(dss, err), err)
		jobs, err := cs.BatchV1().Jobs(Namespace).List(ctx, l)
		add("job", listNames(jobs, err), err)
		svcs, err := cs.CoreV1().Services(Namespace).List(ctx, l)
		add("service", listNames(svcs, err), err)
		cms, err := cs.CoreV1().ConfigMaps(Namespace).List(ctx, l)
		add("configmap", without(listNames(cms, err), "kube-root-ca.crt"), err)
		secrets, err := cs.CoreV1().Secrets(Namespace).List(ctx, l)
		add("secret", listNames(secrets, err), err)
		sas, err := cs.CoreV1().ServiceAccounts(Namespace).List(ctx, l)
		add("serviceaccount", without(listNames(sas, err), "default"), err)
		roles, err := cs.RbacV1().Roles(Namespace).List(ctx, l)
		add("role", listNames(roles, err), err)
		rbs, err := cs.RbacV1().RoleBindings(Namespace).List(ctx, l)
		add("rolebinding", listNames(rbs, err), err)
		crs, err := cs.RbacV1().ClusterRoles().List(ctx, l)
		add("clusterrole", matching(listNames(crs, err), "fleetmirror", "spegel"), err)
		crbs, err := cs.RbacV1().ClusterRoleBindings().List(ctx, l)
		add("clusterrolebinding", matching(listNames(crbs, err), "fleetmirror", "spegel"), err)
		spegels, err := s.dyn.Resource(SpegelResource).List(ctx, l)
		if err == nil {
			for _, sp := range spegels.Items {
				left = append(left, "spegel/"+sp.GetNamespace()+"/"+sp.GetName())
			}
		} else {
			left = append(left, "spegel: "+err.Error())
		}
		leases, err := cs.CoordinationV1().Leases(Namespace).List(ctx, l)
		add("lease", listNames(leases, err), err)
		nodes, err := cs.CoreV1().Nodes().List(ctx, l)
		if err == nil {
			for _, n := range nodes.Items {
				for _, t := range n.Spec.Taints {
					if strings.Contains(t.Key, "fleetmirror") {
						left = append(left, "taint "+t.Key+" on "+n.Name)
					}
				}
			}
		}
		return len(left) == 0, "left: " + strings.Join(left, ", "), nil
	})
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

// waitSpegelReady waits for the Spegel resource's Ready condition with
// status.nodes.ready == nodes.
func (s *scenario) waitSpegelReady(ctx context.Context, nodes int, timeout time.Duration) error {
	t0, last := time.Now(), ""
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		obj, err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		ready, _, _ := unstructured.NestedInt64(obj.Object, "status", "nodes", "ready")
		conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
		var cs []string
		isReady := false
		for _, c := range conds {
			m, _ := c.(map[string]any)
			cs = append(cs, fmt.Sprintf("%v=%v (%v)", m["type"], m["status"], m["message"]))
			if m["type"] == "Ready" && m["status"] == "True" {
				isReady = true
			}
		}
		status := fmt.Sprintf("nodes ready %d/%d; conditions: %s; pods: %s",
			ready, nodes, strings.Join(cs, "; "), s.podSummary(ctx, Namespace))
		if status != last {
			s.logf("spegel status after %v: %s", time.Since(t0).Round(100*time.Millisecond), status)
			last = status
		}
		return isReady && ready == int64(nodes), status, nil
	})
}

func (s *scenario) podSummary(ctx context.Context, ns string) string {
	pods, err := s.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var st []string
	for _, p := range pods.Items {
		state := string(p.Status.Phase)
		for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			if w := cs.State.Waiting; w != nil {
				state += "/" + cs.Name + " " + w.Reason + ": " + w.Message
			} else if cs.State.Running != nil && !cs.Ready {
				state += "/" + cs.Name + " not ready"
			}
		}
		st = append(st, fmt.Sprintf("%s@%s %s", p.Name, p.Spec.NodeName, state))
	}
	return strings.Join(st, "; ")
}

// podOn returns the running pod matching selector on node.
func (s *scenario) podOn(ctx context.Context, ns, selector, node string) (*corev1.Pod, error) {
	pods, err := s.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector, FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return nil, err
	}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			return &p, nil
		}
	}
	return nil, fmt.Errorf("no pod %s on %s", selector, node)
}

// waitPodReplaced waits for a Ready pod matching selector on node other
// than old.
func (s *scenario) waitPodReplaced(ctx context.Context, ns, selector, node string, old types.UID, timeout time.Duration) error {
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		p, err := s.podOn(ctx, ns, selector, node)
		if err != nil {
			return false, err.Error(), nil
		}
		if p.UID == old {
			return false, "old pod still there", nil
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("pod %s not Ready: %s", p.Name, s.podSummary(ctx, ns)), nil
	})
}

// podLogs returns the last lines of every container's log in ns, for
// failures.
func (s *scenario) podLogs(ctx context.Context, ns string, lines int64) string {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pods, err := s.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range pods.Items {
		for _, c := range append(p.Spec.InitContainers, p.Spec.Containers...) {
			out, err := s.c.Client.CoreV1().Pods(ns).GetLogs(p.Name, &corev1.PodLogOptions{Container: c.Name, TailLines: &lines}).DoRaw(ctx)
			if err != nil {
				out = []byte(err.Error())
			}
			fmt.Fprintf(&b, "--- %s/%s on %s\n%s\n", p.Name, c.Name, p.Spec.NodeName, strings.TrimRight(string(out), "\n"))
		}
	}
	return b.String()
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

// runHelm runs the helm binary against the cluster, with its own config
// and cache dirs.
func (s *scenario) runHelm(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, s.helm, append(args, "--kubeconfig", s.c.Kubeconfig)...)
	cmd.Env = append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(s.home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(s.home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(s.home, "data"),
	)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("helm %s: %w\n%s\npods in %s: %s", args[0], err, out.String(), Namespace, s.podSummary(ctx, Namespace))
	}
	return out.String(), nil
}

// kubectlGetSpegel is `kubectl get spegel -A` in short.
func (s *scenario) kubectlGetSpegel(ctx context.Context) (string, error) {
	obj, err := s.dyn.Resource(SpegelResource).Namespace(Namespace).Get(ctx, Spegel, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	ready, _, _ := unstructured.NestedInt64(obj.Object, "status", "nodes", "ready")
	desired, _, _ := unstructured.NestedInt64(obj.Object, "status", "nodes", "desired")
	var b strings.Builder
	proven, _, _ := unstructured.NestedString(obj.Object, "status", "mirrorPath", "summary")
	fmt.Fprintf(&b, "spegel %s/%s: nodes %d/%d ready, path proven %s\n", obj.GetNamespace(), obj.GetName(), ready, desired, proven)
	failing, _, _ := unstructured.NestedSlice(obj.Object, "status", "mirrorPath", "failing")
	for _, f := range failing {
		m, _ := f.(map[string]any)
		fmt.Fprintf(&b, "  failing %v at %v: %s\n", m["node"], m["step"], short(fmt.Sprint(m["reason"])))
	}
	conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		fmt.Fprintf(&b, "  %v=%v", m["type"], m["status"])
		if msg, _ := m["message"].(string); msg != "" {
			first, _, _ := strings.Cut(msg, "\n")
			fmt.Fprintf(&b, " (%v): %s", m["reason"], first)
		}
		b.WriteString("\n")
	}
	return strings.TrimRight(b.String(), "\n"), nil
}
