package kube

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Cluster DNS: CoreDNS (hack/tools/coredns: the kubernetes plugin and no
// forwarder) runs in the control plane namespace on port 53; kubelets give
// it to pods as their nameserver. It answers for cluster.local only and
// refuses everything else, so no query leaves the machine.
const (
	ClusterDomain = "cluster.local"
	dnsReadyPort  = 8181
	dnsHealthPort = 8080
)

const corefile = `.:53 {
    ready %s
    health %s
    errors
    cache 5
    kubernetes %s in-addr.arpa ip6.arpa {
        kubeconfig %s
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
}
`

// startDNS gives CoreDNS read access to what it serves (the ClusterRole
// kubeadm gives it), starts it and waits until it has synced.
func (c *Cluster) startDNS(ctx context.Context) error {
	dir := filepath.Join(c.Dir, "control-plane")
	const user = "system:coredns"
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: user},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		},
	}
	if _, err := c.Client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("kube: DNS role: %w", err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: user},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: user},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: user}},
	}
	if _, err := c.Client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("kube: DNS role binding: %w", err)
	}
	kp, err := c.pki.issue("coredns", user, nil, nil, nil)
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(dir, "coredns.kubeconfig")
	if err := writeKubeconfig(kubeconfig, c.Server, c.pki.CACert, kp); err != nil {
		return err
	}
	conf := filepath.Join(dir, "Corefile")
	ready := netip.AddrPortFrom(c.cpIP, dnsReadyPort).String()
	health := netip.AddrPortFrom(c.cpIP, dnsHealthPort).String()
	if err := os.WriteFile(conf, fmt.Appendf(nil, corefile, ready, health, ClusterDomain, kubeconfig), 0o644); err != nil {
		return err
	}
	if err := c.startComponent(c.cpNS, dir, "coredns", c.bins.coredns, "-conf", conf); err != nil {
		return err
	}
	c.DNS = netip.AddrPortFrom(c.cpIP, 53)
	// Ready once the kubernetes plugin has synced with the API server.
	client := &http.Client{Timeout: 2 * time.Second}
	defer client.CloseIdleConnections()
	return c.Poll(ctx, 60*time.Second, func(ctx context.Context) (bool, string, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ready+"/ready", nil)
		resp, err := client.Do(req)
		if err != nil {
			return false, err.Error(), nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, "CoreDNS /ready: " + resp.Status, nil
	})
}

// Resolver asks the cluster DNS directly (the host reaches the control
// plane namespace on the run's subnet), never the machine's resolver.
func (c *Cluster) Resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, c.DNS.String())
	}}
}
