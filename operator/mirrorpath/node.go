package mirrorpath

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// NodeWriter puts the FleetmirrorMirrorPath condition on nodes. It needs
// only `patch` on nodes/status: a strategic merge patch of one condition,
// merged by type, leaves the kubelet's conditions alone, and nothing is
// read. It writes a node again only when the condition changed (or after
// the operator restarts, which moves lastTransitionTime to then).
type NodeWriter struct {
	// Only Status().Patch: what the RBAC grants.
	client client.StatusClient

	mu   sync.Mutex
	last map[string]written
}

// NewNodeWriter returns a writer that patches node status through c.
func NewNodeWriter(c client.StatusClient) *NodeWriter {
	return &NodeWriter{client: c, last: map[string]written{}}
}

type written struct {
	c     Condition
	since metav1.Time
}

// Set writes c on node unless it is already there.
func (w *NodeWriter) Set(ctx context.Context, node string, c Condition) error {
	w.mu.Lock()
	prev, seen := w.last[node]
	w.mu.Unlock()
	if seen && prev.c == c {
		return nil
	}
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	since := now
	if seen && prev.c.Status == c.Status {
		since = prev.since
	}
	body, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{{
		Type: ConditionType, Status: corev1.ConditionStatus(c.Status), Reason: c.Reason, Message: c.Message,
		LastHeartbeatTime: now, LastTransitionTime: since,
	}}}})
	if err != nil {
		return err
	}
	n := &corev1.Node{}
	n.Name = node
	err = w.client.Status().Patch(ctx, n, client.RawPatch(types.StrategicMergePatchType, body))
	if apierrors.IsNotFound(err) {
		w.Forget(node)
		return nil
	}
	if err != nil {
		return fmt.Errorf("node %s: writing condition %s: %w", node, ConditionType, err)
	}
	w.mu.Lock()
	w.last[node] = written{c: c, since: since}
	w.mu.Unlock()
	return nil
}

// Forget drops what was written on node (gone, or no longer an agent's).
func (w *NodeWriter) Forget(node string) {
	w.mu.Lock()
	delete(w.last, node)
	w.mu.Unlock()
}

// RemoveAll takes the condition off every node it was written on, for when
// the Spegel resource goes: a node left saying its mirror path is proven
// after the agents are gone would mislead whoever reads it. A node that
// cannot be patched now keeps its entry for the next call.
func (w *NodeWriter) RemoveAll(ctx context.Context) error {
	w.mu.Lock()
	nodes := make([]string, 0, len(w.last))
	for n := range w.last {
		nodes = append(nodes, n)
	}
	w.mu.Unlock()
	// The strategic merge directive deletes the list item of this type
	// (conditions merge on type); the kubelet's own conditions stay.
	body, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []map[string]any{{"type": ConditionType, "$patch": "delete"}}}})
	if err != nil {
		return err
	}
	var errs []error
	for _, node := range nodes {
		n := &corev1.Node{}
		n.Name = node
		err := w.client.Status().Patch(ctx, n, client.RawPatch(types.StrategicMergePatchType, body))
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("node %s: removing condition %s: %w", node, ConditionType, err))
			continue
		}
		w.Forget(node)
	}
	return errors.Join(errs...)
}
