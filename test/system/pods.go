package system

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func (s *scenario) podSummary(ctx context.Context, ns string) string {
	pods, err := s.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var st []string
	for _, p := range pods.Items {
		state := string(p.Status.Phase)
		for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			if w := cs.State.Waiting; w != nil {
				state += "/" + cs.Name + " " + w.Reason + ": " + w.Message
			} else if cs.State.Running != nil && !cs.Ready {
				state += "/" + cs.Name + " not ready"
			}
		}
		st = append(st, fmt.Sprintf("%s@%s %s", p.Name, p.Spec.NodeName, state))
	}
	return strings.Join(st, "; ")
}

// podOn returns the running pod matching selector on node.
func (s *scenario) podOn(ctx context.Context, ns, selector, node string) (*corev1.Pod, error) {
	pods, err := s.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector, FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return nil, err
	}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			return &p, nil
		}
	}
	return nil, fmt.Errorf("no pod %s on %s", selector, node)
}

// waitPodReplaced waits for a Ready pod matching selector on node other
// than old.
func (s *scenario) waitPodReplaced(ctx context.Context, ns, selector, node string, old types.UID, timeout time.Duration) error {
	return s.c.Poll(ctx, timeout, func(ctx context.Context) (bool, string, error) {
		p, err := s.podOn(ctx, ns, selector, node)
		if err != nil {
			return false, err.Error(), nil
		}
		if p.UID == old {
			return false, "old pod still there", nil
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("pod %s not Ready: %s", p.Name, s.podSummary(ctx, ns)), nil
	})
}

// podLogs returns the last lines of every container's log in ns, for
// failures.
func (s *scenario) podLogs(ctx context.Context, ns string, lines int64) string {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pods, err := s.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range pods.Items {
		for _, c := range append(p.Spec.InitContainers, p.Spec.Containers...) {
			out, err := s.c.Client.CoreV1().Pods(ns).GetLogs(p.Name, &corev1.PodLogOptions{Container: c.Name, TailLines: &lines}).DoRaw(ctx)
			if err != nil {
				out = []byte(err.Error())
			}
			fmt.Fprintf(&b, "--- %s/%s on %s\n%s\n", p.Name, c.Name, p.Spec.NodeName, strings.TrimRight(string(out), "\n"))
		}
	}
	return b.String()
}
