package spegels

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func TestNamespaces(t *testing.T) {
	obj := &unstructured.Unstructured{}
	obj.SetNamespace("team-a")
	obj.SetName("spegel")
	if err := Namespaces(nil).Refusal(obj); err != nil {
		t.Errorf("no namespaces given means every one: %v", err)
	}
	if err := (Namespaces{"spegel", "team-a"}).Refusal(obj); err != nil {
		t.Errorf("a managed namespace refused: %v", err)
	}
	err := (Namespaces{"spegel"}).Refusal(obj)
	if err == nil || !strings.Contains(err.Error(), "managedNamespaces={spegel,team-a}") || !strings.Contains(err.Error(), "not managed") {
		t.Errorf("an unmanaged namespace: %v, want a refusal naming the fix", err)
	}
}
