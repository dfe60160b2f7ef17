package kube

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fleetmirror/fleetmirror/agent/systemd"
)

// probeDaemonSet mounts the node paths the product's DaemonSets use as
// hostPath volumes under /host, writes a file into two of them and lists
// the others, like the agent and prep do.
func probeDaemonSet(image string) *appsv1.DaemonSet {
	ds := sleeperDaemonSet("probe", image, true)
	spec := &ds.Spec.Template.Spec
	dir, create, sock := corev1.HostPathDirectory, corev1.HostPathDirectoryOrCreate, corev1.HostPathSocket
	for _, v := range []struct {
		name, path string
		typ        *corev1.HostPathType
	}{
		{"etc-containerd", "/etc/containerd", &dir},
		{"content", "/var/lib/containerd/io.containerd.content.v1.content", &dir},
		{"sock", "/run/containerd/containerd.sock", &sock},
		{"dbus", "/run/dbus", &dir},
		{"data", "/var/lib/fleetmirror", &create},
	} {
		spec.Volumes = append(spec.Volumes, corev1.Volume{Name: v.name, VolumeSource: corev1.VolumeSource{
			HostPath: &corev1.HostPathVolumeSource{Path: v.path, Type: v.typ},
		}})
		spec.Containers[0].VolumeMounts = append(spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: v.name, MountPath: "/host" + v.path})
	}
	spec.Containers[0].Args = []string{
		"-write=/host/etc/containerd/certs.d/probe/hosts.toml",
		"-write=/host/var/lib/fleetmirror/probe",
		"-ls=/host/etc/containerd",
		"-ls=/host/run/dbus",
		"-ls=/host/run/containerd",
	}
	return ds
}

// TestPrivateMountsPerNode runs a hostPath DaemonSet on 3 nodes with
// Options.PrivateMounts: each pod writes /etc/containerd/certs.d/probe and
// /var/lib/fleetmirror/probe, which must land in its own node's dirs and
// never on the machine. Then the production systemd client restarts one
// node's containerd through that node's bus: only its pid changes.
func TestPrivateMountsPerNode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, mount namespaces, cgroups, containerd, kubelet")
	}
	machine := []string{"/etc/containerd/certs.d/probe/hosts.toml", "/var/lib/fleetmirror/probe"}
	mustNotExist := []string{"/etc/containerd/certs.d/probe", "/var/lib/fleetmirror/probe"}
	for _, p := range mustNotExist {
		if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s exists on this machine before the test (%v): remove it, the test checks that pods never write it", p, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	c, err := Start(ctx, Options{Nodes: 3, PrivateMounts: true, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			if err := c.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
		}
	}()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf(format+"\nlogs:\n%s", append(args, c.LogTail(15))...)
	}
	if len(c.Buses) != 3 {
		fail("%d node buses, want 3", len(c.Buses))
	}

	if _, err := c.Client.AppsV1().DaemonSets("default").Create(ctx, probeDaemonSet(c.SleeperImage), metav1.CreateOptions{}); err != nil {
		fail("create DaemonSet: %v", err)
	}
	err = c.Poll(ctx, 2*time.Minute, func(ctx context.Context) (bool, string, error) {
		ds, err := c.Client.AppsV1().DaemonSets("default").Get(ctx, "probe", metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		s := ds.Status
		return s.DesiredNumberScheduled == 3 && s.NumberReady == 3,
			fmt.Sprintf("desired %d, ready %d; pods: %s", s.DesiredNumberScheduled, s.NumberReady, podSummary(ctx, c, "probe")), nil
	})
	if err != nil {
		fail("%v", err)
	}

	for _, n := range c.Nodes {
		want := "node=" + n.Name + "\n"
		for _, p := range machine {
			mine := n.HostPath(p)
			if mine == p || !strings.HasPrefix(mine, n.Dir+"/") {
				fail("%s: HostPath(%s) = %s, want a path under the node's dir %s", n.Name, p, mine, n.Dir)
			}
			err := c.Poll(ctx, 30*time.Second, func(context.Context) (bool, string, error) {
				b, err := os.ReadFile(mine)
				return string(b) == want, fmt.Sprintf("%s: %q (%v), want %q", mine, b, err, want), nil
			})
			if err != nil {
				fail("%s: the pod's write did not reach the node's own dir: %v", n.Name, err)
			}
			// And the node itself (its containerd's and kubelet's view).
			got, err := n.InMountNS(ctx, "cat", p)
			if err != nil || got != want {
				fail("%s: %s inside the node = %q (%v), want %q", n.Name, p, got, err, want)
			}
		}
		if n.ConfigPath != n.HostPath("/etc/containerd/config.toml") {
			fail("%s: containerd config at %s, want the node's /etc/containerd/config.toml (%s)", n.Name, n.ConfigPath, n.HostPath("/etc/containerd/config.toml"))
		}
	}
	for _, p := range mustNotExist {
		if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
			fail("%s exists on the machine (%v): a pod's hostPath reached the real filesystem", p, err)
		}
	}
	pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=probe"})
	if err != nil {
		fail("list pods: %v", err)
	}
	for _, p := range pods.Items {
		b, err := c.Client.CoreV1().Pods("default").GetLogs(p.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
		if err != nil {
			fail("logs of %s: %v", p.Name, err)
		}
		logs := string(b)
		for _, want := range []string{
			"ls /host/etc/containerd: [certs.d config.toml]",
			"ls /host/run/dbus: [system_bus_socket]",
			"containerd.sock",
		} {
			if !strings.Contains(logs, want) {
				fail("pod %s on %s: log lacks %q: the node's hostPaths are not its own:\n%s", p.Name, p.Spec.NodeName, want, logs)
			}
		}
	}

	// Restarting containerd through one node's bus restarts that node's
	// containerd only: first the production client over node 2's bus as
	// the harness dials it, then dbus-send inside node 3 at the path prep
	// uses there.
	restarts := make([]int, len(c.Nodes))
	restartVia := func(target int, how string, restart func() error) {
		t.Helper()
		before := make([]int, len(c.Nodes))
		for i, n := range c.Nodes {
			before[i] = n.ContainerdPID()
		}
		if err := restart(); err != nil {
			fail("restart %s on %s (%s): %v", ContainerdUnit, c.Nodes[target].Name, how, err)
		}
		restarts[target]++
		err := c.Poll(ctx, time.Minute, func(context.Context) (bool, string, error) {
			var s []string
			done := true
			for i, n := range c.Nodes {
				pid, got := n.ContainerdPID(), c.Buses[i].Systemd.Restarts(ContainerdUnit)
				changed := pid != 0 && pid != before[i]
				if got != restarts[i] || changed != (i == target) {
					done = false
				}
				s = append(s, fmt.Sprintf("%s: pid %d -> %d, %d restarts (want %d)", n.Name, before[i], pid, got, restarts[i]))
			}
			return done, strings.Join(s, "; "), nil
		})
		if err != nil {
			fail("after a restart on %s (%s), only its containerd must be new: %v", c.Nodes[target].Name, how, err)
		}
	}
	restartVia(1, "systemd.Client on "+c.Buses[1].Address, func() error {
		client, err := systemd.Dial(ctx, c.Buses[1].Address)
		if err != nil {
			return err
		}
		defer client.Close()
		return client.RestartUnit(ctx, ContainerdUnit)
	})
	restartVia(2, "dbus-send inside the node", func() error {
		_, err := c.Nodes[2].InMountNS(ctx, "dbus-send", "--bus=unix:path=/run/dbus/system_bus_socket",
			"--print-reply", "--dest=org.freedesktop.systemd1", "/org/freedesktop/systemd1",
			"org.freedesktop.systemd1.Manager.RestartUnit", "string:"+ContainerdUnit, "string:replace")
		return err
	})
	// The restarted containerd still serves the node: its pod keeps
	// running and the node stays Ready.
	if err := c.WaitNodesReady(ctx, time.Minute); err != nil {
		fail("%v", err)
	}

	pids := clusterPIDs(c)
	id, dir := c.ID, c.Dir
	closed = true
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	assertNothingLeft(t, id, dir, pids)
}
