package operator

import (
	"fmt"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// refusedValues: values the chart refuses (a combination the CRD's schema
// does not check): a failed condition with the chart's message.
func (l *lifecycle) refusedValues(t *testing.T) {
	l.setSpec(t, []string{"service"}, map[string]any{"registry": map[string]any{"type": "NodePort"}})
	eventually(t, "failed condition naming the value", 30*time.Second, func() error {
		s, r, m := condition(l.get(t, "fm", "spegel"), "Irreconcilable")
		if s != "True" || !strings.Contains(m, "NodePort needs hostNetwork: false") {
			return fmt.Errorf("Irreconcilable=%s %s %q", s, r, m)
		}
		return nil
	})
	l.setSpec(t, []string{"service"}, map[string]any{"registry": map[string]any{"type": "ClusterIP"}})
	eventually(t, "recovered from the refused values", 30*time.Second, func() error {
		if s, _, m := condition(l.get(t, "fm", "spegel"), "Irreconcilable"); s != "False" {
			return fmt.Errorf("Irreconcilable=%s %q", s, m)
		}
		return nil
	})
}

// invalid: invalid resources are refused by the API server, naming the
// field.
func (l *lifecycle) invalid(t *testing.T) {
	ctx, cl := l.ctx, l.cl
	for _, tc := range []struct {
		spec  map[string]any
		field string
	}{
		{map[string]any{"mirroredRegistries": []any{"docker.io"}}, "spec.mirroredRegistries[0]"},
		{map[string]any{"logLevel": "loud"}, "spec.logLevel"},
		{map[string]any{"mirrorResolveRetries": int64(0)}, "spec.mirrorResolveRetries"},
		{map[string]any{"image": map[string]any{"repository": "Registry/Agent"}}, "spec.image.repository"},
		{map[string]any{"containerdMirrorAdd": false, "prependExisting": true}, "spec.prependExisting"},
		{map[string]any{"privateRegistries": []any{"https://registry.corp"}}, "spec.privateRegistries[0]"},
		{map[string]any{"upstreamTags": []any{"docker.io:latest"}}, "spec.upstreamTags[0]"},
		{map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "lots"}}}, "spec.resources.limits.memory"},
		{map[string]any{"containerd": map[string]any{"certsDir": "etc/containerd/hosts.d"}}, "spec.containerd.certsDir"},
		{map[string]any{"ports": map[string]any{"registry": int64(70000)}}, "spec.ports.registry"},
		{map[string]any{"podLabels": map[string]any{"team": strings.Repeat("x", 64)}}, "spec.podLabels.team"},
		{map[string]any{"mirroredRegistries": []any{"https://docker.io", "https://docker.io"}}, "spec.mirroredRegistries[1]"},
	} {
		err := cl.Create(ctx, spegel("fm", "invalid", tc.spec))
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("spec %v: error %v, want Invalid naming %s", tc.spec, err, tc.field)
		}
	}
}

// secondResource: a second resource, in another namespace, is refused by
// the operator.
func (l *lifecycle) secondResource(t *testing.T) {
	ctx, cl := l.ctx, l.cl
	if err := cl.Create(ctx, spegel("other", "spegel", map[string]any{})); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second resource refused", 30*time.Second, func() error {
		if s, _, m := condition(l.get(t, "other", "spegel"), "Irreconcilable"); s != "True" || !strings.Contains(m, "only one Spegel") {
			return fmt.Errorf("Irreconcilable=%s %q", s, m)
		}
		return nil
	})
	if err := cl.Delete(ctx, spegel("other", "spegel", nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second resource gone", 30*time.Second, func() error {
		err := cl.Get(ctx, client.ObjectKey{Namespace: "other", Name: "spegel"}, spegel("", "", nil))
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("still there: %v", err)
	})
	var dss appsv1.DaemonSetList
	if err := cl.List(ctx, &dss, client.InNamespace("other")); err != nil || len(dss.Items) > 0 {
		t.Fatalf("the refused resource installed DaemonSets: %v %d", err, len(dss.Items))
	}
	l.rss = rssKiB()
}
