// Package spegels says which Spegel resource manages the nodes. Every
// release runs an agent on every node with the same host ports and
// hosts.toml files, so only one may: the oldest, in any namespace. The
// reconciler (refusing the others) and node readiness (following the
// active one's agents) must agree on it, hence one place.
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
