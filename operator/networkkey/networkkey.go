// Package networkkey gives each Spegel resource the shared secret its
// agents prove membership with (the agent's --network-key-file): a Secret
// in the resource's namespace holding a random key. The operator creates
// it once and never writes it again, so reconciles stay stable and a key
// the user rotated stays rotated; it is owned by the resource and goes
// with it.
//
// The addon chart can make such a Secret itself (with Helm's lookup), but
// lookup returns nothing in the server-side dry run the reconciler uses to
// decide whether to upgrade, so under the operator every reconcile would
// see a new key: the operator makes the Secret and names it in the values.
package networkkey

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/agent/peerauth"
	"github.com/fleetmirror/fleetmirror/operator/chartlabels"
)

const (
	// Key is the Secret's data key the chart mounts as the key file.
	Key = "key"
	// MinLen is the shortest key the agent accepts, in bytes after
	// trimming whitespace.
	MinLen = peerauth.MinSecret
)

// SecretName is the Secret the operator creates for the resource named
// resource. It differs from the chart's own (<fullname>-network-key), so a
// release that moves from a plain helm install to the operator never has
// Helm delete the Secret the operator now relies on.
func SecretName(resource string) string { return resource + "-operator-network-key" }

// Ensure makes sure Secret name in owner's namespace holds a usable key.
// With create (the operator's own Secret) a missing one is created with a
// random key, owned by owner; without (a Secret the spec names) it must
// exist. An existing Secret is never written: rotation is the user
// replacing its key, then restarting the agents.
func Ensure(ctx context.Context, c client.Client, owner *unstructured.Unstructured, name string, create bool) error {
	var s corev1.Secret
	err := c.Get(ctx, client.ObjectKey{Namespace: owner.GetNamespace(), Name: name}, &s)
	switch {
	case err == nil:
		return Check(&s)
	case !apierrors.IsNotFound(err):
		return fmt.Errorf("reading the network key Secret %s/%s: %w", owner.GetNamespace(), name, err)
	case !create:
		return fmt.Errorf("spec.networkKey.secretName: Secret %s/%s not found; create it with a %q of at least %d bytes (e.g. kubectl -n %s create secret generic %s --from-literal=%s=$(openssl rand -hex 32)), or leave secretName empty and the operator makes one",
			owner.GetNamespace(), name, Key, MinLen, owner.GetNamespace(), name, Key)
	}
	key, err := New()
	if err != nil {
		return err
	}
	t := true
	s = corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Name:      name,
			Namespace: owner.GetNamespace(),
			Labels:    map[string]string{chartlabels.PartOf: chartlabels.Fleetmirror, chartlabels.ManagedBy: "fleetmirror-operator"},
			// Controller owner: the Helm reconciler watches Secrets its
			// resources control, so deleting this one by hand makes the
			// operator create a new one at once.
			OwnerReferences: []metav1.OwnerReference{{APIVersion: owner.GetAPIVersion(), Kind: owner.GetKind(), Name: owner.GetName(), UID: owner.GetUID(), Controller: &t}},
		},
		Type: corev1.SecretTypeOpaque,
		Data: map[string][]byte{Key: []byte(key)},
	}
	if err := c.Create(ctx, &s); err != nil && !apierrors.IsAlreadyExists(err) {
		// AlreadyExists: the cache had not seen it yet; it is never rewritten.
		return fmt.Errorf("creating the network key Secret %s/%s: %w", owner.GetNamespace(), name, err)
	}
	return nil
}

// Check says what is wrong with the key in s, if anything.
func Check(s *corev1.Secret) error {
	k := strings.TrimSpace(string(s.Data[Key]))
	if len(k) < MinLen {
		return fmt.Errorf("network key Secret %s/%s: %q holds %d bytes, want at least %d (e.g. 64 hex digits: openssl rand -hex 32)",
			s.Namespace, s.Name, Key, len(k), MinLen)
	}
	return nil
}

// New returns a random key: 64 hex digits, 256 bits.
func New() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("network key: %w", err)
	}
	return hex.EncodeToString(b), nil
}
