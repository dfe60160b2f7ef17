package system

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
	"github.com/fleetmirror/fleetmirror/test/kube"
	"k8s.io/apimachinery/pkg/types"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The Spegel install the migration starts from: Spegel's chart's release,
// namespace and ports. The agent is ours (the addon chart installed
// directly, as Spegel's chart would be); the names and ports are what
// must not collide.
const (
	spegelRelease   = "spegel"
	spegelNamespace = "spegel"
)

// migrate runs the operator README's "Migrating from Spegel's chart"
// (alongside, then remove Spegel) on the prepared nodes: a Spegel-shaped
// install, ours beside it on its own names and ports, `helm uninstall
// spegel`, a restart of our agents, and no Spegel object left. It ends
// with our addon installed and serving peers.
func (s *scenario) migrate(ctx context.Context) error {
	n := len(s.c.Nodes)
	agentRef := s.mirror + "/ghcr.io/fleetmirror/agent"
	args := []string{"install", spegelRelease, "oci://" + s.mirror + "/helm-charts/spegel", "--version", s.version, "--plain-http",
		"--namespace", spegelNamespace, "--create-namespace",
		"--set", "image.repository=" + agentRef, "--set", "image.tag=" + s.version,
		"--set", "cleanup.waitImage=" + s.mirror + "/ghcr.io/fleetmirror/operator:" + s.version,
		"--set", "ports.registry=30020", "--set", "ports.router=30021", "--set", "ports.metrics=30022",
		"--set", "debugWebAddr=127.0.0.1:30023",
		"--set", "mirroredRegistries={" + s.c.Upstream.URL() + "}",
		"--wait", "--timeout", "3m"}
	s.say("Migrating from a Spegel install: release %s in namespace %s on Spegel's ports 30020-30023 (helm %s)", spegelRelease, spegelNamespace, strings.Join(args, " "))
	if _, err := s.runHelm(ctx, args...); err != nil {
		return err
	}
	if err := s.checkMirrorPort(ctx, "30020"); err != nil {
		return fmt.Errorf("the Spegel install: %w", err)
	}

	restarts := make([]int, len(s.c.Nodes))
	for i := range s.c.Nodes {
		restarts[i] = s.c.Buses[i].Systemd.Restarts(kube.ContainerdUnit)
	}
	t0 := time.Now()
	s.say("  Step 1: our operator alongside it, on our own names and ports: helm %s", strings.Join(s.installArgs(), " "))
	if _, err := s.runHelm(ctx, s.installArgs()...); err != nil {
		return err
	}
	if err := s.waitSpegelReady(ctx, n, 3*time.Minute); err != nil {
		return err
	}
	s.rep.time("reinstall to agents ready", time.Since(t0))
	for i, node := range s.c.Nodes {
		if got := s.c.Buses[i].Systemd.Restarts(kube.ContainerdUnit); got != restarts[i] {
			return fmt.Errorf("%s: containerd restarted %d times by prep after an install on a prepared node, want still %d", node.Name, got, restarts[i])
		}
	}
	if err := s.checkMirrorPort(ctx, "30120"); err != nil {
		return fmt.Errorf("step 2, verify: %w", err)
	}
	if pods, err := s.c.Client.CoreV1().Pods(spegelNamespace).List(ctx, metav1.ListOptions{}); err != nil || len(pods.Items) < n {
		return fmt.Errorf("the Spegel install's pods while both run: %v (%v)", listNames(pods, err), err)
	}
	s.say("  Step 2: both run; %s Ready on %d nodes in %v, prep restarted no containerd, every node's hosts.toml names :30120 first", Spegel, n, s.rep.Timings["reinstall to agents ready"].Round(100*time.Millisecond))

	if _, err := s.runHelm(ctx, "uninstall", spegelRelease, "--namespace", spegelNamespace, "--wait", "--timeout", "3m"); err != nil {
		return err
	}
	if err := s.checkUpstreamHostsRestored(ctx); err != nil {
		return fmt.Errorf("step 3, after helm uninstall %s: %w", spegelRelease, err)
	}
	s.say("  Step 3: helm uninstall %s -n %s: its cleanup hook put back every node's own hosts.toml, removing ours with Spegel's", spegelRelease, spegelNamespace)

	if err := s.restartAgents(ctx); err != nil {
		return err
	}
	if err := s.checkMirrorPort(ctx, "30120"); err != nil {
		return fmt.Errorf("step 4, after the restart: %w", err)
	}
	s.say("  Step 4: kubectl rollout restart daemonset/%s: every node's hosts.toml names our agent again", Spegel)

	if err := s.checkSpegelGone(ctx); err != nil {
		return err
	}
	s.say("  Step 5: nothing of the Spegel install is left; namespace %s deleted", spegelNamespace)

	ref, err := s.pushWorkload(ctx, 4, "v4")
	if err != nil {
		return err
	}
	ps, _, err := s.scaleAndMeasure(ctx, "migrated", ref, 2)
	if err != nil {
		return err
	}
	for _, p := range ps[1:] {
		if p.UpstreamBlobBytes != 0 || p.PeerBytes < s.opts.WorkloadSize*9/10 {
			return fmt.Errorf("after the migration %s took %d blob bytes from the upstream and %d from peers: want the whole image from peers", p.Node, p.UpstreamBlobBytes, p.PeerBytes)
		}
	}
	s.say("  migrated: a rollout's later nodes took every layer from peers through our agents")
	return s.c.Client.AppsV1().Deployments(workloadNS).Delete(ctx, workloadName, metav1.DeleteOptions{})
}

// checkMirrorPort checks every node's hosts.toml for the upstream asks an
// agent on port first.
func (s *scenario) checkMirrorPort(ctx context.Context, port string) error {
	return s.c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		for _, node := range s.c.Nodes {
			files, err := readCertsDir(node.CertsDir)
			if err != nil {
				return false, err.Error(), nil
			}
			f := files[s.c.Upstream.Host()+"/hosts.toml"]
			i := strings.Index(f, "[host.")
			if i < 0 || !strings.Contains(firstLines(f[i:], 1), ":"+port) {
				return false, fmt.Sprintf("%s: hosts.toml for %s does not name :%s first:\n%s", node.Name, s.c.Upstream.Host(), port, f), nil
			}
		}
		return true, "", nil
	})
}

// checkUpstreamHostsRestored checks every node's hosts.toml for the
// upstream is the one it had before any install: no agent's.
func (s *scenario) checkUpstreamHostsRestored(ctx context.Context) error {
	key := s.c.Upstream.Host() + "/hosts.toml"
	return s.c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		for _, node := range s.c.Nodes {
			files, err := readCertsDir(node.CertsDir)
			if err != nil {
				return false, err.Error(), nil
			}
			want, ok := s.hostsBefore[node.Name][key]
			if !ok { // the fresh node: what it joined with
				want = cluster.UpstreamHostsTOML(s.c.Upstream)
			}
			if files[key] != want {
				return false, fmt.Sprintf("%s: %s is\n%s\nwant the node's own\n%s", node.Name, key, files[key], want), nil
			}
		}
		return true, "", nil
	})
}

// restartAgents is `kubectl rollout restart` of our agent DaemonSet, and
// waits for the restarted agents to be ready.
func (s *scenario) restartAgents(ctx context.Context) error {
	dss := s.c.Client.AppsV1().DaemonSets(Namespace)
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339))
	if _, err := dss.Patch(ctx, Spegel, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("restarting the agents: %w", err)
	}
	err := s.c.Poll(ctx, 3*time.Minute, func(ctx context.Context) (bool, string, error) {
		ds, err := dss.Get(ctx, Spegel, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		st := ds.Status
		return st.ObservedGeneration >= ds.Generation && st.UpdatedNumberScheduled == st.DesiredNumberScheduled && st.NumberReady == st.DesiredNumberScheduled && st.NumberUnavailable == 0,
			fmt.Sprintf("daemonset %s: %d updated, %d ready of %d", Spegel, st.UpdatedNumberScheduled, st.NumberReady, st.DesiredNumberScheduled), nil
	})
	if err != nil {
		return err
	}
	return s.waitSpegelReady(ctx, len(s.c.Nodes), 2*time.Minute)
}

// checkSpegelGone checks the Spegel install's namespace holds nothing but
// what Kubernetes puts in every namespace, then deletes it.
func (s *scenario) checkSpegelGone(ctx context.Context) error {
	cs := s.c.Client
	err := s.c.Poll(ctx, time.Minute, func(ctx context.Context) (bool, string, error) {
		var left []string
		l := metav1.ListOptions{}
		pods, err := cs.CoreV1().Pods(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("pod", listNames(pods, err))...)
		dss, err := cs.AppsV1().DaemonSets(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("daemonset", listNames(dss, err))...)
		jobs, err := cs.BatchV1().Jobs(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("job", listNames(jobs, err))...)
		svcs, err := cs.CoreV1().Services(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("service", listNames(svcs, err))...)
		secrets, err := cs.CoreV1().Secrets(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("secret", listNames(secrets, err))...)
		cms, err := cs.CoreV1().ConfigMaps(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("configmap", without(listNames(cms, err), "kube-root-ca.crt"))...)
		sas, err := cs.CoreV1().ServiceAccounts(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("serviceaccount", without(listNames(sas, err), "default"))...)
		roles, err := cs.RbacV1().Roles(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("role", listNames(roles, err))...)
		rbs, err := cs.RbacV1().RoleBindings(spegelNamespace).List(ctx, l)
		left = append(left, prefixed("rolebinding", listNames(rbs, err))...)
		return len(left) == 0, fmt.Sprintf("left in namespace %s: %s", spegelNamespace, strings.Join(left, ", ")), nil
	})
	if err != nil {
		return err
	}
	return cs.CoreV1().Namespaces().Delete(ctx, spegelNamespace, metav1.DeleteOptions{})
}

func prefixed(kind string, names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = kind + "/" + n
	}
	return out
}
