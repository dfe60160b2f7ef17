package imagecheck

import (
	"strings"
	"testing"
)

const manifests = `apiVersion: apps/v1
kind: DaemonSet
metadata: {name: a, namespace: ns}
spec:
  template:
    spec:
      initContainers:
        - name: prep
          image: m.corp:5000/mirror/ghcr.io/fleetmirror/agent:v1
      containers:
        - name: agent
          image: m.corp:5000/mirror/ghcr.io/fleetmirror/agent:v1
---
# a hook
apiVersion: batch/v1
kind: Job
metadata: {name: w, namespace: ns}
spec:
  template:
    spec:
      containers:
        - name: wait
          image: IMAGE
---
apiVersion: charts.fleetmirror.dev/v1alpha1
kind: Spegel
metadata: {name: s}
spec:
  image: {repository: ghcr.io/fleetmirror/agent}
`

func TestEscapes(t *testing.T) {
	for _, tc := range []struct {
		image, want string
	}{
		{"m.corp:5000/mirror/ghcr.io/fleetmirror/operator:v1", ""},
		{"m.corp:5000/mirror/docker.io/library/nginx:1@sha256:" + strings.Repeat("a", 64), ""},
		{"ghcr.io/fleetmirror/operator:v1", "Job ns/w: containers[0]: image ghcr.io/fleetmirror/operator:v1 is not under the mirror m.corp:5000/mirror"},
		{"m.corp:5000/other/ghcr.io/fleetmirror/operator:v1", "not under the mirror"},
		{"m.corp/mirror/ghcr.io/fleetmirror/operator:v1", "not under the mirror"},
		{"nginx", "not under the mirror"},
		{"m.corp:5000/mirror/Bad", "invalid image reference"},
		{"", "empty"},
	} {
		got, err := Escapes("m.corp:5000/mirror/", strings.Replace(manifests, "IMAGE", tc.image, 1))
		if err != nil {
			t.Fatal(err)
		}
		if tc.want == "" {
			if len(got) != 0 {
				t.Errorf("%s: escapes %v, want none", tc.image, got)
			}
			continue
		}
		if len(got) != 1 || !strings.Contains(got[0], tc.want) {
			t.Errorf("%s: escapes %v, want one containing %q", tc.image, got, tc.want)
		}
	}
	imgs, _ := Images(manifests)
	if len(imgs) != 3 {
		t.Errorf("found %d images, want 3 (the Spegel resource's image map is not a container)", len(imgs))
	}
	if _, err := Escapes("https://m.corp", manifests); err == nil {
		t.Error("a bad mirror was accepted")
	}
}
