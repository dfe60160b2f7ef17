package operator

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestChartSurvivesNodeRestarts checks two things the whole-system test
// (test/system) found broken on a real cluster, for every chart case:
//   - no pod mounts a socket file by hostPath: the mount pins the socket
//     the daemon had when the pod started, and a restarted containerd or
//     dbus-daemon (prep restarts containerd) makes a new one the pod never
//     sees. Mount the socket's folder.
//   - a post-delete hook's pods name a service account the hook itself
//     creates: Helm removes the release's own before post-delete hooks
//     run, and a pod naming a missing account is never created.
func TestChartSurvivesNodeRestarts(t *testing.T) {
	ch := loadChart(t)
	for _, c := range loadCases(t) {
		t.Run(c.Name, func(t *testing.T) {
			objs := decodeAll(t, render(t, ch, c))
			hookAccounts := map[string]bool{}
			for _, o := range objs {
				if o.GetKind() == "ServiceAccount" && strings.Contains(o.GetAnnotations()["helm.sh/hook"], "post-delete") {
					hookAccounts[o.GetName()] = true
				}
			}
			for _, o := range objs {
				spec, ok, _ := unstructured.NestedMap(o.Object, "spec", "template", "spec")
				if !ok {
					continue
				}
				what := o.GetKind() + "/" + o.GetName()
				vols, _, _ := unstructured.NestedSlice(spec, "volumes")
				for _, v := range vols {
					hp, ok, _ := unstructured.NestedMap(v.(map[string]any), "hostPath")
					if !ok {
						continue
					}
					path, _ := hp["path"].(string)
					if hp["type"] == "Socket" || strings.HasSuffix(path, ".sock") || strings.HasSuffix(path, "_socket") {
						t.Errorf("%s mounts the socket %s by hostPath: a restarted daemon's new socket would never reach the pod; mount its folder", what, path)
					}
				}
				if strings.Contains(o.GetAnnotations()["helm.sh/hook"], "post-delete") {
					sa, _ := spec["serviceAccountName"].(string)
					if !hookAccounts[sa] {
						t.Errorf("post-delete hook %s runs as service account %q, which is not a post-delete hook object: Helm has deleted the release's accounts by then", what, sa)
					}
				}
			}
		})
	}
}
