package oci

import (
	"errors"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

const dgst = "sha256:7b3ccabffc97de872a30dfd234fd972a66d247c8cfc69b0550f276481852627c"

func TestParseRequest(t *testing.T) {
	tests := []struct {
		path, ns string
		want     Request
		key      string
		err      string
	}{
		{path: "/v2/library/nginx/manifests/latest", ns: "docker.io",
			want: Request{Registry: "docker.io", Repository: "library/nginx", Kind: KindManifest, Tag: "latest"},
			key:  "docker.io/library/nginx:latest"},
		{path: "/v2/library/nginx/manifests/" + dgst, ns: "docker.io",
			want: Request{Registry: "docker.io", Repository: "library/nginx", Kind: KindManifest, Digest: dgst}, key: dgst},
		{path: "/v2/team/app/blobs/" + dgst, ns: "10.1.2.3:5000",
			want: Request{Registry: "10.1.2.3:5000", Repository: "team/app", Kind: KindBlob, Digest: dgst}, key: dgst},
		{path: "/v2/a/b/c/manifests/v1.2-rc_3",
			want: Request{Repository: "a/b/c", Kind: KindManifest, Tag: "v1.2-rc_3"}, key: ""},
		{path: "/v2/app/blobs/latest", err: "blobs are addressed by digest"},
		{path: "/v2/app/manifests/sha512:abc", err: "invalid digest"},
		{path: "/v2/app/blobs/sha512:" + strings.Repeat("a", 128), err: "invalid digest"},
		{path: "/v2/App/manifests/latest", err: "repository name"},
		{path: "/v2/app/manifests/-bad", err: "tag"},
		{path: "/v2/app/manifests/latest", ns: "bad/host", err: "ns parameter"},
		{path: "/v2/app/tags/list", err: "want /v2/"},
		{path: "/v2/", err: "want /v2/"},
		{path: "/v2/app/manifests/", err: "want /v2/"},
		{path: "/v2/../manifests/x", err: "repository name"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			got, err := ParseRequest(tt.path, tt.ns)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("error = %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if got.Key() != tt.key {
				t.Fatalf("key %q, want %q", got.Key(), tt.key)
			}
		})
	}
}

func TestParseImage(t *testing.T) {
	tests := []struct {
		in     string
		tagKey string
		digest digest.Digest
		err    bool
	}{
		{in: "docker.io/library/nginx:1.27", tagKey: "docker.io/library/nginx:1.27"},
		{in: "10.1.2.3:5000/team/app:v1", tagKey: "10.1.2.3:5000/team/app:v1"},
		{in: "ghcr.io/org/app@" + dgst, digest: dgst},
		{in: "ghcr.io/org/app:v1@" + dgst, tagKey: "ghcr.io/org/app:v1", digest: dgst},
		{in: "nginx", err: true},
		{in: dgst, err: true},
	}
	for _, tt := range tests {
		img, err := ParseImage(tt.in)
		if tt.err {
			if err == nil {
				t.Errorf("%s: no error", tt.in)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tt.in, err)
			continue
		}
		if img.TagKey() != tt.tagKey || img.Digest != tt.digest {
			t.Errorf("%s: got %q %q", tt.in, img.TagKey(), img.Digest)
		}
		if tt.tagKey != "" && RegistryOfKey(img.TagKey()) != img.Registry {
			t.Errorf("%s: registry of key %q", tt.in, RegistryOfKey(img.TagKey()))
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add("/v2/library/nginx/manifests/latest", "docker.io")
	f.Add("/v2/a/blobs/"+dgst, "10.0.0.1:5000")
	f.Add("/v2//manifests/x", "")
	f.Fuzz(func(t *testing.T, path, ns string) {
		req, err := ParseRequest(path, ns)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error not ErrInvalid: %v", err)
			}
			return
		}
		if (req.Tag == "") == (req.Digest == "") {
			t.Fatalf("want exactly one of tag and digest: %+v", req)
		}
		if req.Digest != "" && req.Digest.Validate() != nil {
			t.Fatalf("invalid digest accepted: %q", req.Digest)
		}
		if strings.Contains(req.Repository, "..") || strings.HasPrefix(req.Repository, "/") {
			t.Fatalf("unsafe repository accepted: %q", req.Repository)
		}
		if k := req.Key(); k != "" && !IsDigestKey(k) && RegistryOfKey(k) != req.Registry {
			t.Fatalf("key %q does not name registry %q", k, req.Registry)
		}
	})
}

func FuzzParseImage(f *testing.F) {
	f.Add("docker.io/library/nginx:1.27")
	f.Add("10.1.2.3:5000/team/app:v1@" + dgst)
	f.Fuzz(func(t *testing.T, s string) {
		img, err := ParseImage(s)
		if err != nil {
			return
		}
		if img.Registry == "" || img.Repository == "" {
			t.Fatalf("parsed %q without registry or repository: %+v", s, img)
		}
		if k := img.TagKey(); k != "" && RegistryOfKey(k) != img.Registry {
			t.Fatalf("key %q does not name registry %q", k, img.Registry)
		}
	})
}
