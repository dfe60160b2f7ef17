package system

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"

	"github.com/fleetmirror/fleetmirror/release/version"
	"github.com/fleetmirror/fleetmirror/test/cluster"
	"github.com/fleetmirror/fleetmirror/test/kube"
)

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
