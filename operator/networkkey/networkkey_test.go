package networkkey

import (
	"context"
	"encoding/hex"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
)

func owner() *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion("charts.fleetmirror.dev/v1alpha1")
	u.SetKind("Spegel")
	u.SetNamespace("fm")
	u.SetName("spegel")
	u.SetUID(types.UID("uid-1"))
	return u
}

func TestEnsure(t *testing.T) {
	ctx := context.Background()
	c := fake.NewClientBuilder().Build()
	name := SecretName("spegel")
	if err := Ensure(ctx, c, owner(), name, true); err != nil {
		t.Fatal(err)
	}
	var s corev1.Secret
	if err := c.Get(ctx, client.ObjectKey{Namespace: "fm", Name: name}, &s); err != nil {
		t.Fatal(err)
	}
	k, err := hex.DecodeString(string(s.Data[Key]))
	if err != nil || len(k) != 32 {
		t.Errorf("key %q: want 64 hex digits", s.Data[Key])
	}
	if r := s.OwnerReferences; len(r) != 1 || r[0].UID != "uid-1" || r[0].Kind != "Spegel" || r[0].Controller == nil || !*r[0].Controller {
		t.Errorf("owner references %+v", r)
	}

	// Never rewritten: a key the user put there stays.
	s.Data[Key] = []byte(strings.Repeat("x", 40))
	if err := c.Update(ctx, &s); err != nil {
		t.Fatal(err)
	}
	if err := Ensure(ctx, c, owner(), name, true); err != nil {
		t.Fatal(err)
	}
	_ = c.Get(ctx, client.ObjectKey{Namespace: "fm", Name: name}, &s)
	if string(s.Data[Key]) != strings.Repeat("x", 40) {
		t.Errorf("the key was rewritten: %q", s.Data[Key])
	}

	// Too short: refused, naming the fix, and still not rewritten.
	s.Data[Key] = []byte("  short \n")
	_ = c.Update(ctx, &s)
	if err := Ensure(ctx, c, owner(), name, true); err == nil || !strings.Contains(err.Error(), "openssl rand -hex 32") {
		t.Errorf("a short key: %v", err)
	}

	// A Secret the spec names is never created.
	if err := Ensure(ctx, c, owner(), "corp-key", false); err == nil || !strings.Contains(err.Error(), "spec.networkKey.secretName") {
		t.Errorf("a missing named Secret: %v", err)
	}
	if err := c.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "corp-key"}, &s); err == nil {
		t.Error("the operator created a Secret the spec named")
	}
	good := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "fm", Name: "corp-key"}, Data: map[string][]byte{Key: []byte(strings.Repeat("ab", 32) + "\n")}}
	if err := c.Create(ctx, good); err != nil {
		t.Fatal(err)
	}
	if err := Ensure(ctx, c, owner(), "corp-key", false); err != nil {
		t.Errorf("a good named Secret: %v", err)
	}
}

func TestNewIsRandom(t *testing.T) {
	a, _ := New()
	b, _ := New()
	if a == b || len(a) != 64 {
		t.Fatalf("New gave %q and %q", a, b)
	}
}
