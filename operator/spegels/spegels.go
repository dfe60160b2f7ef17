// Package spegels says which Spegel resource manages the nodes. Every
// release runs an agent on every node with the same host ports and
// hosts.toml files, so only one may: the oldest, in any namespace. The
// reconciler (refusing the others) and node readiness (following the
// active one's agents) must agree on it, hence one place. It also says
// which namespaces the operator may act in at all (Namespaces).
package spegels

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Oldest returns the resource of kind gvk created first (ties broken by
// namespace/name), or nil when there is none.
func Oldest(ctx context.Context, c client.Reader, gvk schema.GroupVersionKind) (*unstructured.Unstructured, error) {
	list := &unstructured.UnstructuredList{}
	list.SetGroupVersionKind(gvk.GroupVersion().WithKind(gvk.Kind + "List"))
	if err := c.List(ctx, list); err != nil {
		return nil, fmt.Errorf("listing %s resources: %w", gvk.Kind, err)
	}
	if len(list.Items) == 0 {
		return nil, nil
	}
	oldest := slices.MinFunc(list.Items, func(a, b unstructured.Unstructured) int {
		ta, tb := a.GetCreationTimestamp(), b.GetCreationTimestamp()
		switch {
		case ta.Before(&tb):
			return -1
		case tb.Before(&ta):
			return 1
		}
		return strings.Compare(a.GetNamespace()+"/"+a.GetName(), b.GetNamespace()+"/"+b.GetName())
	})
	return &oldest, nil
}

// Namespaces are the namespaces the operator may act in: where its chart
// gave it Roles, and all its cache watches of namespaced kinds. Empty
// means every namespace (an operator run with cluster-wide rights).
type Namespaces []string

// Manages says whether the operator may act in namespace ns.
func (n Namespaces) Manages(ns string) bool {
	return len(n) == 0 || slices.Contains(n, ns)
}

// Refusal says why obj, in a namespace the operator does not manage, is
// not reconciled, and how to fix it; nil when its namespace is managed.
func (n Namespaces) Refusal(obj client.Object) error {
	ns := obj.GetNamespace()
	if n.Manages(ns) {
		return nil
	}
	return fmt.Errorf("namespace %s is not managed by the operator: it may act only in %s (the operator chart's managedNamespaces gives it rights there and nowhere else); "+
		"add %s to managedNamespaces (helm upgrade <release> helm-charts/operator --reuse-values --set 'managedNamespaces={%s}'), or delete %s/%s and create it in one of %s",
		ns, strings.Join(n, ", "), ns, strings.Join(append(slices.Clone(n), ns), ","), obj.GetNamespace(), obj.GetName(), strings.Join(n, ", "))
}
