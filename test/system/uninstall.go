package system

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fleetmirror/fleetmirror/agent/nodetaint"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
	"github.com/fleetmirror/fleetmirror/operator/readiness"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// uninstall deletes the Spegel resource (the DaemonSets go, and each
// node's mirror configuration is restored), then helm uninstalls the
// operator: nothing of ours may remain.
func (s *scenario) uninstall(ctx context.Context) error {
	s.say("Uninstalling: deleting the Spegel resource, then `helm uninstall %s`.", Release)
	t0 := time.Now()
	if err := s.recordNodes(ctx); err != nil {
		return err
	}
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
	s.say("  uninstalled in %v; nothing of the operator or the addon is left (the CRD stays, as Helm never deletes CRDs; on the nodes, the readiness annotations and the agent's identity key stay)", s.rep.Timings["uninstall"].Round(100*time.Millisecond))
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
	if err := s.recordNodes(ctx); err != nil {
		return err
	}
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

// checkNothingLeft lists what the operator and the addon could have made,
// in the cluster and on the nodes.
func (s *scenario) checkNothingLeft(ctx context.Context) error {
	if err := s.checkNothingLeftInCluster(ctx); err != nil {
		return err
	}
	return s.checkNodesLeft(ctx)
}

// keptAnnotations are the node annotations an uninstall keeps on purpose
// (helm-charts/operator/README.md, "The mirror path of each node"): a node
// marked ready once is not held again by a later install, and the agent's
// and the operator's release records stay where people look for them.
var keptAnnotations = []string{readiness.ReadyAnnotation, readiness.ReleasedAnnotation, nodetaint.ReleasedAnnotation}

// dataDir is the agent's data directory on the node (the chart's
// dataDir, the agent's --data-dir).
const dataDir = "/var/lib/fleetmirror"

// recordNodes records each node's fleetmirror annotations before an
// uninstall, for checkNodesLeft, and checks that each node's data
// directory holds its agent's identity key, so checkNodesLeft looks where
// the agents wrote.
func (s *scenario) recordNodes(ctx context.Context) error {
	nodes, err := s.c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	s.annotationsBefore = map[string]map[string]string{}
	ready := 0
	for _, n := range nodes.Items {
		s.annotationsBefore[n.Name] = ourAnnotations(n.Annotations)
		if s.annotationsBefore[n.Name][readiness.ReadyAnnotation] != "" {
			ready++
		}
	}
	if ready == 0 {
		return fmt.Errorf("no node is annotated %s before the uninstall: the annotation check would prove nothing", readiness.ReadyAnnotation)
	}
	for _, n := range s.c.Nodes {
		if _, err := os.Stat(filepath.Join(n.HostPath(dataDir), routing.KeyFile)); err != nil {
			return fmt.Errorf("%s: no agent identity key in %s before the uninstall: %w", n.Name, dataDir, err)
		}
	}
	return nil
}

// checkNodesLeft checks what an uninstall leaves on the nodes: of the
// fleetmirror annotations, the readiness ones recorded before the
// uninstall, unchanged, and no other; in the agent's data directory,
// nothing but its identity key (the agent's only state: kept, so a
// reinstall keeps the node's peer ID).
func (s *scenario) checkNodesLeft(ctx context.Context) error {
	nodes, err := s.c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	var left []string
	for _, n := range nodes.Items {
		got := ourAnnotations(n.Annotations)
		for k, v := range got {
			if !slices.Contains(keptAnnotations, k) {
				left = append(left, fmt.Sprintf("annotation %s=%q on %s", k, v, n.Name))
			}
		}
		for k, v := range s.annotationsBefore[n.Name] {
			if got[k] != v {
				left = append(left, fmt.Sprintf("annotation %s on %s is %q after the uninstall, %q before: readiness annotations stay", k, n.Name, got[k], v))
			}
		}
	}
	for _, n := range s.c.Nodes {
		entries, err := os.ReadDir(n.HostPath(dataDir))
		if err != nil {
			return fmt.Errorf("%s: %s: %w", n.Name, dataDir, err)
		}
		for _, e := range entries {
			if e.Name() != routing.KeyFile {
				left = append(left, fmt.Sprintf("%s on %s", filepath.Join(dataDir, e.Name()), n.Name))
			}
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("left on the nodes: %s", strings.Join(left, ", "))
	}
	return nil
}

// ourAnnotations are a node's fleetmirror.dev annotations.
func ourAnnotations(all map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range all {
		if strings.HasPrefix(k, "fleetmirror.dev/") {
			out[k] = v
		}
	}
	return out
}

// checkNothingLeftInCluster lists the objects the operator and the addon
// could have made.
func (s *scenario) checkNothingLeftInCluster(ctx context.Context) error {
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
