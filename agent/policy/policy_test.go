package policy

import (
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/agent/oci"
)

func TestPolicy(t *testing.T) {
	p, err := New([]string{"registry.corp.example:5000", "index.docker.io"},
		[]string{":latest", "ghcr.io", "quay.io/org/app", "10.0.0.1:5000/team/svc:main"})
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromString("x")
	for _, tc := range []struct {
		req  oci.Request
		want bool
	}{
		{oci.Request{Registry: "registry.corp.example:5000", Repository: "a", Digest: d}, false},
		{oci.Request{Registry: "docker.io", Repository: "library/nginx", Tag: "1.27"}, false}, // Docker Hub is private here
		{oci.Request{Registry: "registry.k8s.io", Repository: "pause", Tag: "latest"}, false},
		{oci.Request{Registry: "registry.k8s.io", Repository: "pause", Tag: "3.10"}, true},
		{oci.Request{Registry: "registry.k8s.io", Repository: "pause", Digest: d}, true},
		{oci.Request{Registry: "ghcr.io", Repository: "x/y", Tag: "v1"}, false},
		{oci.Request{Registry: "ghcr.io", Repository: "x/y", Digest: d}, true}, // digests name the same bytes everywhere
		{oci.Request{Registry: "quay.io", Repository: "org/app", Tag: "v2"}, false},
		{oci.Request{Registry: "quay.io", Repository: "org/other", Tag: "v2"}, true},
		{oci.Request{Registry: "10.0.0.1:5000", Repository: "team/svc", Tag: "main"}, false},
		{oci.Request{Registry: "10.0.0.1:5000", Repository: "team/svc", Tag: "v1"}, true},
	} {
		if got := p.Shared(tc.req); got != tc.want {
			t.Errorf("Shared(%+v) = %v, want %v", tc.req, got, tc.want)
		}
	}
	if p.SharedImage("registry.corp.example:5000/a:v1") || !p.SharedImage("ghcr.io/x/y:v1") {
		t.Error("SharedImage does not follow the private registries")
	}
	if p.SharedKey("ghcr.io/x/y:v1") || p.SharedKey("registry.k8s.io/pause:latest") || !p.SharedKey("registry.k8s.io/pause:3.10") || !p.SharedKey(d.String()) {
		t.Error("SharedKey does not follow the policy")
	}
	var none *Policy
	if !none.Shared(oci.Request{Registry: "x", Tag: "latest"}) || !none.SharedKey("x/y:z") {
		t.Error("a nil policy keeps something back")
	}
}

func TestPolicyRefusesBadEntries(t *testing.T) {
	for _, tc := range []struct{ private, tags []string }{
		{[]string{"https://ghcr.io"}, nil},
		{[]string{"ghcr.io/org"}, nil},
		{nil, []string{":"}},
		{nil, []string{"ghcr.io/org/app:"}},
		{nil, []string{""}},
		{nil, []string{":a/b"}},
	} {
		if _, err := New(tc.private, tc.tags); err == nil || !strings.Contains(err.Error(), "want") {
			t.Errorf("New(%q, %q) err = %v, want one that says what to write", tc.private, tc.tags, err)
		}
	}
}
