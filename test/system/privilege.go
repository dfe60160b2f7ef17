package system

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// operatorAccount is the operator chart's ServiceAccount for Release.
const operatorAccount = "system:serviceaccount:" + Namespace + ":" + Release + "-operator"

// checkLeastPrivilege checks, with the API server's own authorizer, that
// the operator's account may touch Secrets, DaemonSets and RoleBindings
// in the namespace it manages and nowhere else; and that the Secret it
// made there is the key every agent runs with (no agent warns of an open
// network).
func (s *scenario) checkLeastPrivilege(ctx context.Context) error {
	type q struct {
		verb, group, resource, ns string
		want                      bool
	}
	var denied []string
	for _, c := range []q{
		{"get", "", "secrets", Namespace, true},
		{"create", "apps", "daemonsets", Namespace, true},
		{"get", "", "secrets", workloadNS, false},
		{"list", "", "secrets", "kube-system", false},
		{"list", "", "secrets", "", false},
		{"create", "apps", "daemonsets", workloadNS, false},
		{"create", "rbac.authorization.k8s.io", "rolebindings", workloadNS, false},
		{"create", "rbac.authorization.k8s.io", "roles", "", false},
	} {
		sar, err := s.c.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{
				User:               operatorAccount,
				Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + Namespace, "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: c.verb, Group: c.group, Resource: c.resource, Namespace: c.ns},
			}}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		where := c.ns
		if where == "" {
			where = "every namespace"
		}
		if sar.Status.Allowed != c.want {
			return fmt.Errorf("the operator may %s %s in %s: %v, want %v (%s)", c.verb, c.resource, where, sar.Status.Allowed, c.want, sar.Status.Reason)
		}
		if !c.want {
			denied = append(denied, c.verb+" "+c.resource+" in "+where)
		}
	}
	s.say("  the API server's authorizer: the operator may read Secrets and create DaemonSets in %s only; denied: %s", Namespace, strings.Join(denied, ", "))

	sec, err := s.c.Client.CoreV1().Secrets(Namespace).Get(ctx, Spegel+"-operator-network-key", metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("the operator's network key Secret: %w", err)
	}
	if b, err := hex.DecodeString(string(sec.Data["key"])); err != nil || len(b) != 32 {
		return fmt.Errorf("network key Secret %s: %d bytes, not 64 hex digits", sec.Name, len(sec.Data["key"]))
	}
	pods, err := s.c.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"})
	if err != nil {
		return err
	}
	if len(pods.Items) == 0 {
		return fmt.Errorf("no agent pods")
	}
	for _, p := range pods.Items {
		mounted := false
		for _, v := range p.Spec.Volumes {
			mounted = mounted || v.Secret != nil && v.Secret.SecretName == sec.Name
		}
		if !mounted {
			return fmt.Errorf("agent pod %s does not mount the network key Secret %s", p.Name, sec.Name)
		}
		out, err := s.c.Client.CoreV1().Pods(Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: "agent"}).DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("agent logs of %s: %w", p.Name, err)
		}
		if strings.Contains(string(out), "no --network-key-file") {
			return fmt.Errorf("agent %s on %s runs an open network", p.Name, p.Spec.NodeName)
		}
	}
	s.say("  the operator made the network key Secret %s; all %d agents run members-only with it", sec.Name, len(pods.Items))
	return nil
}
