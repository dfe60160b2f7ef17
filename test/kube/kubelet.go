package kube

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// Kubelet ports on every node (each node has its own network namespace,
// so they are the same on all of them).
const (
	KubeletPort        = 10250
	kubeletHealthzPort = 10248
)

// Kubelet is one node's kubelet.
type Kubelet struct {
	Node    *cluster.Node
	Name    string // the Kubernetes node name (the harness node's name)
	PodCIDR string // the node's bridge CNI range, routed from every node and the control plane
	RootDir string
	Log     string
	Cgroup  string // cgroupRoot, "/fm-<id>-<node>" in every v1 hierarchy

	sup *supervisor
}

// kubeletConfig is the KubeletConfiguration of one node. Everything that
// defaults to a machine-wide path or port is set per node; image GC and
// disk eviction are off so the imported sandbox image and test images stay.
var kubeletConfig = template.Must(template.New("kubelet").Parse(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{{.IP}}"
port: {{.Port}}
readOnlyPort: 0
healthzBindAddress: "127.0.0.1"
healthzPort: {{.HealthzPort}}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: "{{.CA}}"
authorization:
  mode: Webhook
containerRuntimeEndpoint: "unix://{{.Socket}}"
cgroupDriver: cgroupfs
cgroupRoot: "{{.Cgroup}}"
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
podLogsDir: "{{.PodLogs}}"
volumePluginDir: "{{.VolumePlugins}}"
resolvConf: ""
clusterDomain: cluster.local
clusterDNS: ["{{.DNS}}"]
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
serializeImagePulls: false
nodeStatusReportFrequency: 10s
shutdownGracePeriod: 0s
`))

// cniConfig is the node's bridge network: pods get addresses of PodCIDR on
// a bridge inside the node's namespace, with the node as their gateway. No
// masquerading; the node routes only the run's subnet and the API server's
// Service IP, so pods reach the nodes, the control plane and the pods
// beside them, and nothing off the machine.
const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": %q}]],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dataDir": %q
    }
  }]
}
`

// startKubelet configures and starts the kubelet of node i (1-based).
func (c *Cluster) startKubelet(ctx context.Context, i int, n *cluster.Node, extraArgs ...string) (*Kubelet, error) {
	k := &Kubelet{
		Node: n,
		Name: n.Name,
		// 10.199/16 is outside the 10.200-249 range test/cluster picks run
		// subnets from, and only exists inside node namespaces.
		PodCIDR: fmt.Sprintf("10.199.%d.0/24", i),
		RootDir: filepath.Join(n.Dir, "kubelet"),
		Log:     filepath.Join(n.Dir, "kubelet.log"),
	}
	dir := filepath.Join(n.Dir, "kubelet-config")
	for _, d := range []string{k.RootDir, dir, n.CNIConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	cg, err := c.MakeCgroup(n.Name)
	if err != nil {
		return nil, err
	}
	k.Cgroup = cg
	conf := fmt.Sprintf(cniConfig, c.CNINetworkName(), k.PodCIDR, filepath.Join(n.Dir, "cni", "ipam"))
	if err := os.WriteFile(filepath.Join(n.CNIConfDir, "10-"+c.CNINetworkName()+".conflist"), []byte(conf), 0o644); err != nil {
		return nil, err
	}
	// The API server's Service IP lives in the control plane namespace
	// (see apiServerServiceIP), which routes replies to pods back here.
	if err := run(ctx, "ip", "-n", n.NS, "route", "add", netip.PrefixFrom(apiServerServiceIP, 32).String(), "via", c.cpIP.String()); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "-n", c.cpNS, "route", "add", k.PodCIDR, "via", n.IP.String()); err != nil {
		return nil, err
	}
	// Pod ranges are routed between nodes, as a cloud's VPC routes do:
	// pods reach pods and hostNetwork pods of other nodes, and replies
	// find their way back.
	for _, other := range c.Kubelets {
		if err := run(ctx, "ip", "-n", other.Node.NS, "route", "add", k.PodCIDR, "via", n.IP.String()); err != nil {
			return nil, err
		}
		if err := run(ctx, "ip", "-n", n.NS, "route", "add", other.PodCIDR, "via", other.Node.IP.String()); err != nil {
			return nil, err
		}
	}
	cert, err := c.pki.issue("kubelet-"+n.Name, "system:node:"+n.Name, []string{"system:nodes"}, []net.IP{n.IP.AsSlice()}, nil)
	if err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, c.Server, c.pki.CACert, cert); err != nil {
		return nil, err
	}
	vals := map[string]any{
		"IP": n.IP, "Port": KubeletPort, "HealthzPort": kubeletHealthzPort, "DNS": c.DNS.Addr(),
		"CA": c.pki.CACert, "Socket": n.Socket, "Cgroup": cg,
		"PodLogs": filepath.Join(n.Dir, "pod-logs"), "VolumePlugins": filepath.Join(dir, "volume-plugins"),
	}
	for k, v := range vals {
		if s, ok := v.(string); ok && strings.ContainsAny(s, "\"\\\n") {
			return nil, fmt.Errorf("kubelet config: %s %q cannot go into YAML unquoted", k, s)
		}
	}
	var b strings.Builder
	if err := kubeletConfig.Execute(&b, vals); err != nil {
		return nil, err
	}
	config := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(config, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	// In the node's mount namespace (if it has one), as hostPath volumes
	// and the mounts kubelet makes for pods must be what containerd sees.
	start := func() (*cluster.Process, error) {
		return n.StartProcess(k.Log, nil, c.bins.kubelet, append([]string{
			"--config=" + config,
			"--kubeconfig=" + kubeconfig,
			"--root-dir=" + k.RootDir,
			"--cert-dir=" + filepath.Join(dir, "pki"),
			"--hostname-override=" + n.Name,
			"--node-ip=" + n.IP.String(),
			"--v=0",
		}, extraArgs...)...)
	}
	k.sup, err = supervise("kube "+c.ID+": "+n.Name+": kubelet", k.Log, start, c.logf)
	if err != nil {
		return nil, err
	}
	c.logf("kube %s: %s: kubelet started (pid %d)", c.ID, n.Name, k.sup.pid())
	return k, nil
}

// exited reports a kubelet that keeps dying, with its log tail.
func (k *Kubelet) exited() error { return k.sup.failed() }

// Pid is the running kubelet's pid (a restart changes it).
func (k *Kubelet) Pid() int { return k.sup.pid() }

// Restarts is how often the kubelet died and was started again.
func (k *Kubelet) Restarts() int { return k.sup.restarts() }
