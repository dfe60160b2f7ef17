package kube

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// Versions of the tools hack/tools.sh builds.
const (
	KubeVersion       = "v1.34.4"
	etcdVersion       = "v3.6.16"
	shimVersion       = "v2.4.2"
	cniPluginsVersion = "v1.9.1"
	corednsVersion    = "v1.12.3"
)

// Ports inside the control plane's own namespace; fixed, since no other run
// shares that namespace. The API server takes 443, the port of the
// "kubernetes" Service, so pods reach it at that Service's ClusterIP too.
const (
	APIServerPort = 443
	etcdPort      = 2379
)

// serviceCIDR holds the Services' ClusterIPs. Only the first, the
// "kubernetes" Service's, is reachable (apiServerServiceIP); no kube-proxy
// runs (see the package comment).
const serviceCIDR = "10.96.0.0/16"

// apiServerServiceIP is the "kubernetes" Service's ClusterIP. Rather than
// kube-proxy rules, the control plane namespace holds this address and
// every node routes it there, so in-cluster clients (operators, service
// account tokens) reach the API server as in any cluster.
var apiServerServiceIP = netip.MustParseAddr("10.96.0.1")

// binaries are the tools this package runs, from cluster.ToolsDir().
type binaries struct {
	etcd, apiserver, controllerManager, scheduler, kubelet, coredns string
	shimDir, cniDir                                                 string
}

func findBinaries() (binaries, error) {
	t := cluster.ToolsDir()
	node := filepath.Join(t, "kube-node-"+KubeVersion, "bin")
	b := binaries{
		etcd:              filepath.Join(t, "etcd-"+etcdVersion, "bin", "etcd"),
		apiserver:         filepath.Join(t, "kube-"+KubeVersion, "bin", "kube-apiserver"),
		controllerManager: filepath.Join(node, "kube-controller-manager"),
		scheduler:         filepath.Join(node, "kube-scheduler"),
		kubelet:           filepath.Join(node, "kubelet"),
		coredns:           filepath.Join(t, "coredns-"+corednsVersion, "bin", "coredns"),
		shimDir:           filepath.Join(t, "containerd-shim-"+shimVersion, "bin"),
		cniDir:            filepath.Join(t, "cni-plugins-"+cniPluginsVersion, "bin"),
	}
	for _, p := range []string{b.etcd, b.apiserver, b.controllerManager, b.scheduler, b.kubelet, b.coredns,
		filepath.Join(b.shimDir, "containerd-shim-runc-v2"), filepath.Join(b.cniDir, "bridge"),
		filepath.Join(b.cniDir, "host-local"), filepath.Join(b.cniDir, "loopback")} {
		if fi, err := os.Stat(p); err != nil || fi.Mode()&0o111 == 0 {
			return b, fmt.Errorf("kube: %s is missing: run `make tools` (hack/tools.sh builds it)", p)
		}
	}
	return b, nil
}

// component is one control plane daemon.
type component struct {
	name string
	log  string
	proc *cluster.Process
}

// startControlPlane runs etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler in namespace ns (address ip) and waits for the API server.
func (c *Cluster) startControlPlane(ctx context.Context, ns string, ip netip.Addr) error {
	dir := filepath.Join(c.Dir, "control-plane")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := run(ctx, "ip", "-n", ns, "addr", "add", netip.PrefixFrom(apiServerServiceIP, 32).String(), "dev", "lo"); err != nil {
		return err
	}
	p, err := newPKI(filepath.Join(dir, "pki"))
	if err != nil {
		return err
	}
	c.pki = p
	c.Server = "https://" + netip.AddrPortFrom(ip, APIServerPort).String()
	serving, err := p.issue("apiserver", "kube-apiserver", nil,
		[]net.IP{ip.AsSlice(), net.IPv4(127, 0, 0, 1), net.IPv4(10, 96, 0, 1)},
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc"})
	if err != nil {
		return err
	}
	// system:masters so kubelets' webhook authorization lets the API server
	// fetch logs and exec.
	kubeletClient, err := p.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil)
	if err != nil {
		return err
	}
	saKey, err := p.serviceAccountKey()
	if err != nil {
		return err
	}
	admin, err := p.issue("admin", "fleetmirror-admin", []string{"system:masters"}, nil, nil)
	if err != nil {
		return err
	}
	c.Kubeconfig = filepath.Join(dir, "admin.kubeconfig")
	if err := writeKubeconfig(c.Kubeconfig, c.Server, p.CACert, admin); err != nil {
		return err
	}
	kubeconfigs := map[string]string{}
	for _, u := range []struct{ name, cn string }{
		{"kube-controller-manager", "system:kube-controller-manager"},
		{"kube-scheduler", "system:kube-scheduler"},
	} {
		kp, err := p.issue(u.name, u.cn, nil, nil, nil)
		if err != nil {
			return err
		}
		kubeconfigs[u.name] = filepath.Join(dir, u.name+".kubeconfig")
		if err := writeKubeconfig(kubeconfigs[u.name], c.Server, p.CACert, kp); err != nil {
			return err
		}
	}

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort+1)
	if err := c.startComponent(ns, dir, "etcd", c.bins.etcd,
		"--name=etcd",
		"--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=etcd="+peerURL,
		"--unsafe-no-fsync=true", "--log-level=warn",
	); err != nil {
		return err
	}
	if err := c.startComponent(ns, dir, "kube-apiserver", c.bins.apiserver,
		"--etcd-servers="+etcdURL,
		// All of the namespace's addresses: its IP, loopback, and
		// apiServerServiceIP.
		"--bind-address=0.0.0.0", fmt.Sprintf("--secure-port=%d", APIServerPort),
		"--advertise-address="+ip.String(),
		"--tls-cert-file="+serving.Cert, "--tls-private-key-file="+serving.Key,
		"--client-ca-file="+p.CACert,
		"--kubelet-client-certificate="+kubeletClient.Cert, "--kubelet-client-key="+kubeletClient.Key,
		// Without this the API server resolves node names with the
		// machine's resolver, and a DNS query leaves the machine.
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saKey, "--service-account-signing-key-file="+saKey,
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=0",
	); err != nil {
		return err
	}
	if err := c.waitAPIServer(ctx, admin); err != nil {
		return err
	}
	if err := c.startComponent(ns, dir, "kube-controller-manager", c.bins.controllerManager,
		"--kubeconfig="+kubeconfigs["kube-controller-manager"],
		"--authentication-kubeconfig="+kubeconfigs["kube-controller-manager"],
		"--authorization-kubeconfig="+kubeconfigs["kube-controller-manager"],
		"--bind-address=127.0.0.1",
		"--service-account-private-key-file="+saKey,
		"--root-ca-file="+p.CACert,
		"--use-service-account-credentials=true",
		"--flex-volume-plugin-dir="+filepath.Join(dir, "flexvolume"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--leader-elect=false",
		"--profiling=false",
		"--v=0",
	); err != nil {
		return err
	}
	return c.startComponent(ns, dir, "kube-scheduler", c.bins.scheduler,
		"--kubeconfig="+kubeconfigs["kube-scheduler"],
		"--authentication-kubeconfig="+kubeconfigs["kube-scheduler"],
		"--authorization-kubeconfig="+kubeconfigs["kube-scheduler"],
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--profiling=false",
		"--v=0",
	)
}

func (c *Cluster) startComponent(ns, dir, name, bin string, args ...string) error {
	log := filepath.Join(dir, name+".log")
	p, err := cluster.StartProcess(ns, log, nil, bin, args...)
	if err != nil {
		return err
	}
	c.components = append(c.components, &component{name: name, log: log, proc: p})
	c.logf("kube %s: %s started (pid %d)", c.ID, name, p.Pid())
	return nil
}

// checkComponents names the first control plane daemon that has exited.
func (c *Cluster) checkComponents() error {
	for _, comp := range c.components {
		if done, err := comp.proc.Exited(); done {
			return fmt.Errorf("kube: %s exited (%v); log tail:\n%s", comp.name, err, cluster.TailFile(comp.log, 20))
		}
	}
	return nil
}

// waitAPIServer polls /readyz with the admin certificate for up to 60s.
func (c *Cluster) waitAPIServer(ctx context.Context, admin keyPair) error {
	cert, err := tls.LoadX509KeyPair(admin.Cert, admin.Key)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.pki.ca)
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(60 * time.Second)
	var last error
	for {
		if err := c.checkComponents(); err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.Server+"/readyz", nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET /readyz: %s", resp.Status)
		}
		last = err
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("kube: API server not ready after 60s: %w; log tail:\n%s", errors.Join(last, ctx.Err()),
				cluster.TailFile(filepath.Join(c.Dir, "control-plane", "kube-apiserver.log"), 20))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// run runs a command and returns its error with the command's output.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
