package kube

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// sleeperDaemonSet runs the sleeper on every node, with the node's name in
// its environment so its log line says where it runs.
func sleeperDaemonSet(name, image string, hostNetwork bool) *appsv1.DaemonSet {
	labels := map[string]string{"app": name}
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					HostNetwork:                   hostNetwork,
					DNSPolicy:                     corev1.DNSClusterFirstWithHostNet,
					TerminationGracePeriodSeconds: new(int64),
					Containers: []corev1.Container{{
						Name:  "sleeper",
						Image: image,
						Args:  []string{"-api"},
						Env: []corev1.EnvVar{{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{
							FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"},
						}}},
					}},
				},
			},
		},
	}
}

// TestClusterRunsDaemonSets starts 3 nodes, runs a DaemonSet of a locally
// built image on every node (once with bridge CNI pod networking, once with
// host networking), has each pod call the API server as an in-cluster
// client, reads each pod's log through the API server and the kubelet, and
// checks that Close leaves nothing on the machine.
func TestClusterRunsDaemonSets(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, cgroups, containerd, kubelet")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := Start(ctx, Options{Nodes: 3, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cluster up in %v: %v", time.Since(start).Round(time.Millisecond), c.Timings)
	if rss, n, err := c.Memory(ctx); err == nil {
		t.Logf("cluster memory: %d MiB RSS in %d processes (3 nodes, no pods)", rss>>20, n)
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

	nodes, err := c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		fail("list nodes: %v", err)
	}
	if len(nodes.Items) != 3 {
		fail("%d nodes registered, want 3", len(nodes.Items))
	}
	nodeIP := map[string]netip.Addr{}
	for _, n := range c.Nodes {
		nodeIP[n.Name] = n.IP
	}
	for _, n := range nodes.Items {
		var internal string
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				internal = a.Address
			}
		}
		if want, ok := nodeIP[n.Name]; !ok || internal != want.String() {
			fail("node %s has InternalIP %q, want %v (known: %v)", n.Name, internal, want, ok)
		}
		if v := n.Status.NodeInfo.KubeletVersion; v != KubeVersion {
			fail("node %s runs kubelet %s, want %s (hack/tools.sh stamps the version)", n.Name, v, KubeVersion)
		}
	}

	c.Upstream.Reset()
	for _, ds := range []*appsv1.DaemonSet{
		sleeperDaemonSet("sleeper-pod-net", c.SleeperImage, false),
		sleeperDaemonSet("sleeper-host-net", c.SleeperImage, true),
	} {
		if _, err := c.Client.AppsV1().DaemonSets("default").Create(ctx, ds, metav1.CreateOptions{}); err != nil {
			fail("create DaemonSet %s: %v", ds.Name, err)
		}
	}
	t0 := time.Now()
	for _, name := range []string{"sleeper-pod-net", "sleeper-host-net"} {
		err := c.Poll(ctx, 3*time.Minute, func(ctx context.Context) (bool, string, error) {
			ds, err := c.Client.AppsV1().DaemonSets("default").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error(), nil
			}
			s := ds.Status
			return s.DesiredNumberScheduled == 3 && s.NumberReady == 3,
				fmt.Sprintf("%s: desired %d, ready %d; pods: %s", name, s.DesiredNumberScheduled, s.NumberReady, podSummary(ctx, c, name)), nil
		})
		if err != nil {
			fail("%v", err)
		}
	}
	t.Logf("both DaemonSets ready on 3 nodes in %v", time.Since(t0).Round(time.Millisecond))
	if rss, n, err := c.Memory(ctx); err != nil {
		t.Errorf("memory: %v", err)
	} else {
		t.Logf("cluster memory: %d MiB RSS in %d processes (3 nodes, 6 pods)", rss>>20, n)
	}

	// Each node pulled the image from the upstream through CRI.
	stats := c.Upstream.Stats()
	for _, n := range c.Nodes {
		if got := stats.FromClient(n.IP, "GET", "manifest").Requests; got == 0 {
			fail("%s never fetched a manifest from the upstream: the DaemonSet image was not pulled there", n.Name)
		}
	}

	for _, tc := range []struct {
		app         string
		hostNetwork bool
	}{{"sleeper-pod-net", false}, {"sleeper-host-net", true}} {
		pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=" + tc.app})
		if err != nil {
			fail("list pods: %v", err)
		}
		seen := map[string]bool{}
		for _, p := range pods.Items {
			seen[p.Spec.NodeName] = true
			ip, err := netip.ParseAddr(p.Status.PodIP)
			if err != nil {
				fail("pod %s has no IP: %q", p.Name, p.Status.PodIP)
			}
			k := c.kubelet(p.Spec.NodeName)
			if k == nil {
				fail("pod %s on unknown node %q", p.Name, p.Spec.NodeName)
			}
			if tc.hostNetwork {
				if ip != k.Node.IP {
					fail("host-network pod %s has IP %v, want its node's %v", p.Name, ip, k.Node.IP)
				}
			} else if !netip.MustParsePrefix(k.PodCIDR).Contains(ip) {
				fail("pod %s has IP %v outside its node's CNI range %s", p.Name, ip, k.PodCIDR)
			}
			// Logs travel API server -> kubelet -> containerd's log file.
			var logs string
			err = c.Poll(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
				b, err := c.Client.CoreV1().Pods("default").GetLogs(p.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
				logs = string(b)
				if err != nil {
					return false, err.Error(), nil
				}
				return strings.Contains(logs, fmt.Sprintf("started on node %q", p.Spec.NodeName)) &&
					strings.Contains(logs, "sleeper: API"), "log: " + logs, nil
			})
			if err != nil {
				fail("logs of %s: %v", p.Name, err)
			}
			// An in-cluster client: the "kubernetes" Service's ClusterIP
			// and a projected service account token.
			if !strings.Contains(logs, "API server at https://10.96.0.1:443/version answered 200 OK") {
				fail("pod %s could not reach the API server as an in-cluster client:\n%s", p.Name, logs)
			}
			if !strings.Contains(logs, "DNS kubernetes.default = [10.96.0.1]") {
				fail("pod %s could not resolve the API server's Service through cluster DNS:\n%s", p.Name, logs)
			}
		}
		if len(seen) != 3 {
			fail("%s pods ran on %v, want all 3 nodes", tc.app, seen)
		}
	}

	// A headless Service resolves to its pods, the way the agents find
	// each other; names outside the cluster do not resolve at all.
	headless := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "sleepers", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			ClusterIP: corev1.ClusterIPNone,
			Selector:  map[string]string{"app": "sleeper-host-net"},
			Ports:     []corev1.ServicePort{{Name: "none", Port: 1}},
		},
	}
	if _, err := c.Client.CoreV1().Services("default").Create(ctx, headless, metav1.CreateOptions{}); err != nil {
		fail("create Service: %v", err)
	}
	want := []string{c.Nodes[0].IP.String(), c.Nodes[1].IP.String(), c.Nodes[2].IP.String()}
	slices.Sort(want)
	err = c.Poll(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		got, err := c.Resolver().LookupHost(ctx, "sleepers.default.svc."+ClusterDomain)
		slices.Sort(got)
		return slices.Equal(got, want), fmt.Sprintf("headless Service resolves to %v (%v), want %v", got, err, want), nil
	})
	if err != nil {
		fail("%v", err)
	}
	if got, err := c.Resolver().LookupHost(ctx, "example.com"); err == nil {
		fail("cluster DNS answered for example.com: %v (it must not forward)", got)
	}

	// A kubelet that dies is started again, as systemd does on a real
	// node, and takes its node's pods back.
	k := c.Kubelets[0]
	old := k.Pid()
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		fail("kill kubelet: %v", err)
	}
	err = c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		if k.Restarts() != 1 || k.Pid() == old {
			return false, fmt.Sprintf("%s kubelet: %d restarts, pid %d (killed %d)", k.Name, k.Restarts(), k.Pid(), old), nil
		}
		ds, err := c.Client.AppsV1().DaemonSets("default").Get(ctx, "sleeper-pod-net", metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		return ds.Status.NumberReady == 3, "pods: " + podSummary(ctx, c, "sleeper-pod-net"), nil
	})
	if err != nil {
		fail("after a kubelet crash: %v", err)
	}
	if err := c.WaitNodesReady(ctx, time.Minute); err != nil {
		fail("after a kubelet crash: %v", err)
	}
	t.Logf("%s kubelet killed and started again (pid %d -> %d)", k.Name, old, k.Pid())

	// What Close must remove.
	pids := clusterPIDs(c)
	id, dir := c.ID, c.Dir
	closed = true
	t1 := time.Now()
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	t.Logf("closed in %v", time.Since(t1).Round(time.Millisecond))
	assertNothingLeft(t, id, dir, pids)
}

func (c *Cluster) kubelet(node string) *Kubelet {
	for _, k := range c.Kubelets {
		if k.Name == node {
			return k
		}
	}
	return nil
}

func podSummary(ctx context.Context, c *Cluster, app string) string {
	pods, err := c.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		return err.Error()
	}
	var s []string
	for _, p := range pods.Items {
		st := string(p.Status.Phase)
		for _, cs := range p.Status.ContainerStatuses {
			if w := cs.State.Waiting; w != nil {
				st += " " + w.Reason + ": " + w.Message
			}
		}
		for _, cond := range p.Status.Conditions {
			if cond.Status != corev1.ConditionTrue && cond.Message != "" {
				st += " " + string(cond.Type) + ": " + cond.Message
			}
		}
		s = append(s, p.Spec.NodeName+" "+st)
	}
	return strings.Join(s, "; ")
}

// assertNothingLeft checks that no namespace, link, cgroup, mount, process
// or file of run id is left on the machine.
func assertNothingLeft(t *testing.T, id, dir string, pids []int) {
	t.Helper()
	prefix := "fm-" + id + "-"
	for _, args := range [][]string{{"netns", "list"}, {"-o", "link", "show"}} {
		out, err := exec.Command("ip", args...).Output()
		if err != nil {
			t.Fatalf("ip %v: %v", args, err)
		}
		if strings.Contains(string(out), prefix) {
			t.Errorf("ip %v still lists run %s objects:\n%s", args, id, out)
		}
	}
	hier, _ := filepath.Glob("/sys/fs/cgroup/*/" + prefix + "*")
	if len(hier) > 0 {
		t.Errorf("cgroups left: %v", hier)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, dir) || strings.Contains(line, "/run/fm-"+id) {
			t.Errorf("mount left: %s", line)
		}
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); err == nil {
			t.Errorf("pid %d still runs", pid)
		}
	}
	if left, _ := filepath.Glob("/var/lib/cni/results/" + prefix + "*"); len(left) > 0 {
		t.Errorf("CNI cache entries left: %v", left)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("work dir %s still there (%v)", dir, err)
	}
}

// TestLeftoversOfCrashedRun kills a process that runs a 1-node cluster with
// a pod, then checks that the next run's leftover cleanup removes the pod's
// processes, mounts and cgroups with the namespaces and files; once with
// the machine's mounts, once with Options.PrivateMounts (the node's pinned
// mount namespace and its bus must go too).
func TestLeftoversOfCrashedRun(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, cgroups, containerd, kubelet")
	}
	if os.Getenv("FM_KUBE_CRASH_HELPER") == "1" {
		ctx := context.Background()
		c, err := Start(ctx, Options{Nodes: 1, PrivateMounts: os.Getenv("FM_KUBE_CRASH_PRIVATE") == "1"})
		if err != nil {
			fmt.Println("START-ERROR", err)
			os.Exit(1)
		}
		ds := sleeperDaemonSet("sleeper", c.SleeperImage, false)
		if _, err := c.Client.AppsV1().DaemonSets("default").Create(ctx, ds, metav1.CreateOptions{}); err != nil {
			fmt.Println("START-ERROR", err)
			os.Exit(1)
		}
		err = c.Poll(ctx, 2*time.Minute, func(ctx context.Context) (bool, string, error) {
			ds, err := c.Client.AppsV1().DaemonSets("default").Get(ctx, "sleeper", metav1.GetOptions{})
			return err == nil && ds.Status.NumberReady == 1, "", nil
		})
		if err != nil {
			fmt.Println("START-ERROR", err)
			os.Exit(1)
		}
		cluster.AnnounceRunAndWait(c.ID, c.Dir)
	}
	for _, private := range []bool{false, true} {
		t.Run(fmt.Sprintf("PrivateMounts=%v", private), func(t *testing.T) { crashAndClean(t, private) })
	}
}

func crashAndClean(t *testing.T, private bool) {
	env := []string{"FM_KUBE_CRASH_HELPER=1"}
	if private {
		env = append(env, "FM_KUBE_CRASH_PRIVATE=1")
	}
	id, dir := cluster.CrashChild(t, "TestLeftoversOfCrashedRun", env, 3*time.Minute)
	// The pod outlives its crashed harness: its cgroup and mounts are there
	// for the cleanup to remove, or this test proves nothing.
	if left, _ := filepath.Glob("/sys/fs/cgroup/pids/fm-" + id + "-*/*/*/*/cgroup.procs"); len(left) == 0 {
		t.Fatalf("the crashed run left no pod cgroups")
	}
	// Pod mounts sit in the machine's namespace, or (private) in the
	// node's, which its pinned nsfs file keeps alive.
	left := dir
	if private {
		left = "/run/fm-" + id + "/mntns/n1"
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if !strings.Contains(string(mounts), left) {
		t.Fatalf("the crashed run left no mounts under %s", left)
	}
	cluster.CleanupLeftovers(context.Background(), t.Logf)
	assertNothingLeft(t, id, dir, nil)
}

// clusterPIDs are the processes Close must end: control plane, buses and
// kubelets.
func clusterPIDs(c *Cluster) []int {
	var pids []int
	for _, comp := range c.components {
		pids = append(pids, comp.proc.Pid())
	}
	for _, b := range c.Buses {
		pids = append(pids, b.proc.Pid())
	}
	for _, k := range c.Kubelets {
		pids = append(pids, k.Pid())
	}
	return pids
}
