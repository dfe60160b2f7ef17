package imageref

import (
	"errors"
	"strings"
	"testing"
)

const (
	d1 = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	d2 = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
)

// TestMirror is the rewrite table issue 5 asks for: every kind of reference
// an images map or a resource can hold, under several mirror spellings.
func TestMirror(t *testing.T) {
	const m = "registry.corp:5000/mirror"
	tests := []struct {
		mirror, ref, want string
	}{
		// short names canonicalise to docker.io/library
		{m, "nginx", "registry.corp:5000/mirror/docker.io/library/nginx"},
		{m, "nginx:1.27", "registry.corp:5000/mirror/docker.io/library/nginx:1.27"},
		{m, "nginx@" + d1, "registry.corp:5000/mirror/docker.io/library/nginx@" + d1},
		{m, "library/nginx:1.27", "registry.corp:5000/mirror/docker.io/library/nginx:1.27"},
		{m, "bitnami/redis:7", "registry.corp:5000/mirror/docker.io/bitnami/redis:7"},
		{m, "docker.io/nginx", "registry.corp:5000/mirror/docker.io/library/nginx"},
		{m, "docker.io/library/nginx:1.27", "registry.corp:5000/mirror/docker.io/library/nginx:1.27"},
		{m, "index.docker.io/library/nginx:1", "registry.corp:5000/mirror/docker.io/library/nginx:1"},
		{m, "registry-1.docker.io/nginx:1", "registry.corp:5000/mirror/docker.io/library/nginx:1"},
		{m, "Docker.IO/library/nginx:1", "registry.corp:5000/mirror/docker.io/library/nginx:1"},
		// other registries, deep paths, ports
		{m, "ghcr.io/spegel-org/spegel:v0.7.1", "registry.corp:5000/mirror/ghcr.io/spegel-org/spegel:v0.7.1"},
		{m, "quay.io/prometheus/node-exporter:v1.8.2", "registry.corp:5000/mirror/quay.io/prometheus/node-exporter:v1.8.2"},
		{m, "registry.k8s.io/pause:3.10", "registry.corp:5000/mirror/registry.k8s.io/pause:3.10"},
		{m, "public.ecr.aws/a/b/c/d:1", "registry.corp:5000/mirror/public.ecr.aws/a/b/c/d:1"},
		{m, "localhost:5000/app:1", "registry.corp:5000/mirror/localhost_5000/app:1"},
		{m, "localhost/app:1", "registry.corp:5000/mirror/localhost/app:1"},
		{m, "127.0.0.1:5000/team/app:dev", "registry.corp:5000/mirror/127.0.0.1_5000/team/app:dev"},
		{m, "Reg.Example.com:443/app", "registry.corp:5000/mirror/reg.example.com_443/app"},
		{m, "my-registry.example.com:8443/a_b/c__d/e-f:x.y-z_1", "registry.corp:5000/mirror/my-registry.example.com_8443/a_b/c__d/e-f:x.y-z_1"},
		// tags and digests kept; tag+digest keeps both
		{m, "ghcr.io/fleetmirror/agent@" + d1, "registry.corp:5000/mirror/ghcr.io/fleetmirror/agent@" + d1},
		{m, "ghcr.io/fleetmirror/agent:v1@" + d1, "registry.corp:5000/mirror/ghcr.io/fleetmirror/agent:v1@" + d1},
		{m, "nginx:1.27@" + d2, "registry.corp:5000/mirror/docker.io/library/nginx:1.27@" + d2},
		{m, "localhost:5000/app:1@" + d2, "registry.corp:5000/mirror/localhost_5000/app:1@" + d2},
		// legacy paths become registry.k8s.io before mirroring
		{m, "k8s.gcr.io/pause:3.9", "registry.corp:5000/mirror/registry.k8s.io/pause:3.9"},
		{m, "gcr.io/google-containers/pause:3.9", "registry.corp:5000/mirror/registry.k8s.io/pause:3.9"},
		{m, "gcr.io/google_containers/pause:3.9", "registry.corp:5000/mirror/registry.k8s.io/pause:3.9"},
		{m, "k8s.gcr.io/sig-storage/csi-provisioner:v3.5.0", "registry.corp:5000/mirror/registry.k8s.io/sig-storage/csi-provisioner:v3.5.0"},
		{m, "K8S.GCR.IO/pause@" + d1, "registry.corp:5000/mirror/registry.k8s.io/pause@" + d1},
		{m, "gcr.io/distroless/static:nonroot", "registry.corp:5000/mirror/gcr.io/distroless/static:nonroot"},
		// already mirrored: no double prefix
		{m, "registry.corp:5000/mirror/docker.io/library/nginx:1", "registry.corp:5000/mirror/docker.io/library/nginx:1"},
		{m, "REGISTRY.corp:5000/mirror/ghcr.io/x/y@" + d1, "registry.corp:5000/mirror/ghcr.io/x/y@" + d1},
		{m, "registry.corp:5000/mirrorx/app:1", "registry.corp:5000/mirror/registry.corp_5000/mirrorx/app:1"},
		{m, "registry.corp:5000/other/app:1", "registry.corp:5000/mirror/registry.corp_5000/other/app:1"},
		{"registry.corp:5000", "registry.corp:5000/anything/app:1", "registry.corp:5000/anything/app:1"},
		// mirror spellings: trailing slashes, no port, deep prefix, localhost
		{"registry.corp:5000/mirror/", "nginx:1", "registry.corp:5000/mirror/docker.io/library/nginx:1"},
		{"registry.corp:5000/mirror///", "nginx:1", "registry.corp:5000/mirror/docker.io/library/nginx:1"},
		{"registry.corp:5000/", "nginx:1", "registry.corp:5000/docker.io/library/nginx:1"},
		{"mirror.example.com", "ghcr.io/a/b:1", "mirror.example.com/ghcr.io/a/b:1"},
		{"mirror.example.com/a/b/c", "ghcr.io/a/b:1", "mirror.example.com/a/b/c/ghcr.io/a/b:1"},
		{"localhost:5000", "quay.io/a/b:1", "localhost:5000/quay.io/a/b:1"},
		{"localhost", "quay.io/a/b:1", "localhost/quay.io/a/b:1"},
		{"Mirror.Example.COM:5000/p", "a/b:1", "mirror.example.com:5000/p/docker.io/a/b:1"},
		{"10.0.0.1:5000", "k8s.gcr.io/pause:3.9", "10.0.0.1:5000/registry.k8s.io/pause:3.9"},
	}
	for _, tt := range tests {
		got, err := Mirror(tt.mirror, tt.ref)
		if err != nil {
			t.Errorf("Mirror(%q, %q): %v", tt.mirror, tt.ref, err)
			continue
		}
		if got != tt.want {
			t.Errorf("Mirror(%q, %q) = %q, want %q", tt.mirror, tt.ref, got, tt.want)
		}
		// Idempotent: mirroring a mirrored reference changes nothing.
		again, err := Mirror(tt.mirror, got)
		if err != nil || again != got {
			t.Errorf("Mirror(%q, %q) = %q, %v; want it unchanged", tt.mirror, got, again, err)
		}
	}
	if len(tests) < 40 {
		t.Fatalf("the table must hold at least 40 references, has %d", len(tests))
	}
}

func TestMirrorInvalid(t *testing.T) {
	tests := []struct {
		mirror, ref, wantIn string
	}{
		{"registry.corp", "Nginx", "lower case"},
		{"registry.corp", "", "empty"},
		{"registry.corp", "nginx:", "empty tag"},
		{"registry.corp", "nginx@sha256:abc", "digest"},
		{"registry.corp", "nginx@md5:0123456789abcdef0123456789abcdef", "digest"},
		{"registry.corp", "nginx@" + d1 + "@" + d2, "more than one"},
		{"registry.corp", "a//b", "empty path component"},
		{"registry.corp", "/nginx", "empty path component"},
		{"registry.corp", "nginx ", "white space"},
		{"registry.corp", "https://ghcr.io/a/b", "scheme"},
		{"registry.corp", "ghcr.io/a/b:" + strings.Repeat("x", 129), "ghcr.io"},
		{"registry.corp", "[::1]:5000/app:1", "IPv6"},
		{"", "nginx", "empty"},
		{"/", "nginx", "empty"},
		{"https://registry.corp", "nginx", "scheme"},
		{"mirror", "nginx", "not a registry host"},
		{"mirror/prefix", "nginx", "not a registry host"},
		{"registry.corp/Upper", "nginx", "prefix"},
		{"registry.corp//double", "nginx", "prefix"},
		{"registry.corp:port", "nginx", "not a registry host"},
	}
	for _, tt := range tests {
		got, err := Mirror(tt.mirror, tt.ref)
		if err == nil {
			t.Errorf("Mirror(%q, %q) = %q, want an error", tt.mirror, tt.ref, got)
			continue
		}
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.wantIn) {
			t.Errorf("Mirror(%q, %q) error %q: want ErrInvalid mentioning %q", tt.mirror, tt.ref, err, tt.wantIn)
		}
	}
}

func TestParse(t *testing.T) {
	r, err := Parse("127.0.0.1:5000/team/app:v1@" + d1)
	if err != nil {
		t.Fatal(err)
	}
	want := Reference{Registry: "127.0.0.1:5000", Repository: "team/app", Tag: "v1", Digest: d1}
	if r != want {
		t.Errorf("Parse = %+v, want %+v", r, want)
	}
	if got := Path(r); got != "127.0.0.1_5000/team/app" {
		t.Errorf("Path = %q", got)
	}
	for in, want := range map[string]string{
		"busybox":                "docker.io/library/busybox",
		"busybox:1.36":           "docker.io/library/busybox:1.36",
		"ghcr.io/a/b:c@" + d1:    "ghcr.io/a/b:c@" + d1,
		"localhost/x":            "localhost/x",
		"k8s.gcr.io/pause:3.9":   "k8s.gcr.io/pause:3.9", // Parse does not modernize; Mirror does
		"index.docker.io/user/x": "docker.io/user/x",
	} {
		if got, err := Canonical(in); err != nil || got != want {
			t.Errorf("Canonical(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestLegacy(t *testing.T) {
	for in, want := range map[string]string{
		"k8s.gcr.io/pause:3.9":                "registry.k8s.io/pause:3.9",
		"gcr.io/google-containers/pause:3.9":  "registry.k8s.io/pause:3.9",
		"gcr.io/google_containers/pause":      "registry.k8s.io/pause",
		"k8s.gcr.io":                          "registry.k8s.io",
		"gcr.io/google_containers/a/b:v1.2-3": "registry.k8s.io/a/b:v1.2-3",
	} {
		found := LegacyPattern.FindString("image: " + in + " # old")
		if found != in {
			t.Errorf("LegacyPattern found %q in a line with %q", found, in)
		}
		if got := Replacement(found); got != want {
			t.Errorf("Replacement(%q) = %q, want %q", found, got, want)
		}
	}
	for _, s := range []string{"registry.k8s.io/pause:3.9", "gcr.io/distroless/static", "gcr.io/google/containers"} {
		if LegacyPattern.MatchString(s) {
			t.Errorf("LegacyPattern matches %q", s)
		}
	}
	r, _ := Parse("gcr.io/google-containers/pause:3.9")
	if !IsLegacy(r) || Modernize(r).String() != "registry.k8s.io/pause:3.9" {
		t.Errorf("Modernize(%v) = %v", r, Modernize(r))
	}
}

// FuzzMirror checks, for any input, that Mirror never panics, and that
// whatever it accepts is a canonical reference under the mirror that
// parses again and stays put when mirrored again.
func FuzzMirror(f *testing.F) {
	for _, s := range []string{"nginx", "ghcr.io/a/b:c@" + d1, "localhost:5000/x", "k8s.gcr.io/pause:3.9", "a//b", "[::1]:5/x", "UPPER"} {
		f.Add("registry.corp:5000/mirror", s)
	}
	f.Add("mirror.example.com///", "x/y/z:1")
	f.Fuzz(func(t *testing.T, mirror, ref string) {
		got, err := Mirror(mirror, ref)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			return
		}
		m, _ := ParseMirror(mirror)
		r, err := Parse(got)
		if err != nil {
			t.Fatalf("Mirror(%q, %q) = %q, which does not parse: %v", mirror, ref, got, err)
		}
		if !m.Contains(r) || r.String() != got {
			t.Fatalf("Mirror(%q, %q) = %q, not canonical under %v", mirror, ref, got, m)
		}
		if again, err := Mirror(mirror, got); err != nil || again != got {
			t.Fatalf("Mirror twice: %q then %q, %v", got, again, err)
		}
	})
}
