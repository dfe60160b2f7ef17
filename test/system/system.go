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
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"k8s.io/client-go/dynamic"

	"github.com/fleetmirror/fleetmirror/operator/crd"
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
	// Phase runs one named step of the scenario and returns its error
	// (TestWholeSystem runs each as a subtest); default: the step itself.
	Phase func(name string, step func() error) error
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
	// annotationsBefore is each node's fleetmirror.dev annotations before
	// the last uninstall (recordNodes).
	annotationsBefore map[string]map[string]string
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
	if opts.Phase == nil {
		opts.Phase = func(_ string, step func() error) error { return step() }
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
		if err := opts.Phase(st.name, func() error { return st.f(ctx) }); err != nil {
			return s.rep, fmt.Errorf("%s: %w", st.name, err)
		}
	}
	return s.rep, nil
}
