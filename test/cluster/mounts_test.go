package cluster

import "testing"

// HostPath maps only paths at or under a bind's target, by whole path
// elements.
func TestHostPath(t *testing.T) {
	n := &Node{binds: []bind{{"/d/n1/etc/containerd", "/etc/containerd"}, {"/run/fm-x/n1", "/run/containerd"}}}
	for in, want := range map[string]string{
		"/etc/containerd":                      "/d/n1/etc/containerd",
		"/etc/containerd/certs.d/a/hosts.toml": "/d/n1/etc/containerd/certs.d/a/hosts.toml",
		"/etc/containerd/../passwd":            "/etc/passwd",
		"/etc/containerdx/config.toml":         "/etc/containerdx/config.toml",
		"/run/containerd/containerd.sock":      "/run/fm-x/n1/containerd.sock",
		"/var/lib/kubelet":                     "/var/lib/kubelet",
	} {
		if got := n.HostPath(in); got != want {
			t.Errorf("HostPath(%q) = %q, want %q", in, got, want)
		}
	}
	if got := (&Node{}).HostPath("/etc/containerd/config.toml"); got != "/etc/containerd/config.toml" {
		t.Errorf("without private mounts HostPath changed the path: %q", got)
	}
}
