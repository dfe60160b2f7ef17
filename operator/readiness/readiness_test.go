package readiness

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fleetmirror/fleetmirror/operator/mirrorpath"
)

// TestHeldReason: a held node's reason names its agent pod's state and,
// when its mirror path is broken, the canary's finding; a condition that
// is not False adds nothing.
func TestHeldReason(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "agent-x"}, Status: corev1.PodStatus{
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse, Message: "containers with unready status: [agent]"}}}}
	node := func(status corev1.ConditionStatus) *corev1.Node {
		return &corev1.Node{Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{
			{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Message: "kubelet is posting ready status"},
			{Type: mirrorpath.ConditionType, Status: status, Message: "the canary failed at step mirrored-hosts: /etc/containerd/certs.d/r_5000_ shadows /etc/containerd/certs.d/r:5000"},
		}}}
	}
	why := heldReason(pod, node(corev1.ConditionFalse))
	for _, want := range []string{"agent pod agent-x not ready", "step mirrored-hosts", "shadows"} {
		if !strings.Contains(why, want) {
			t.Errorf("broken path: %q lacks %q", why, want)
		}
	}
	for _, st := range []corev1.ConditionStatus{corev1.ConditionTrue, corev1.ConditionUnknown} {
		if why := heldReason(pod, node(st)); strings.Contains(why, "step mirrored-hosts") || strings.Contains(why, "kubelet") {
			t.Errorf("condition %s: %q", st, why)
		}
	}
	if why := heldReason(nil, &corev1.Node{}); !strings.Contains(why, "no agent pod") {
		t.Errorf("no pod: %q", why)
	}
}
