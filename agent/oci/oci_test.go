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
		is       error
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
		{path: "/v2/app/blobs/latest", err: "blobs are addressed by digest", is: ErrDigestInvalid},
		{path: "/v2/app/manifests/sha512:abc", err: "invalid digest", is: ErrDigestInvalid},
		{path: "/v2/app/blobs/sha512:" + strings.Repeat("a", 128), err: "invalid digest", is: ErrDigestInvalid},
		{path: "/v2/app/manifests/sha256:baddigeststring", err: "invalid digest", is: ErrDigestInvalid},
		{path: "/v2/App/manifests/latest", err: "repository", is: ErrNameInvalid},
		{path: "/v2/app/manifests/-bad", err: "tag", is: ErrTagInvalid},
		{path: "/v2/app/manifests/latest", ns: "bad/host", err: "ns parameter", is: ErrNameInvalid},
		// Each would be a tag key and a metric label of its own.
		{path: "/v2/app/manifests/latest", ns: "a b", err: "ns parameter", is: ErrNameInvalid},
		{path: "/v2/app/manifests/latest", ns: "x;y", err: "ns parameter", is: ErrNameInvalid},
		{path: "/v2/app/manifests/latest", ns: "évil.io", err: "ns parameter", is: ErrNameInvalid},
		{path: "/v2/app/manifests/latest", ns: strings.Repeat("a", 256), err: "ns parameter", is: ErrNameInvalid},
		{path: "/v2/app/manifests/latest", ns: "[::1]:5000", want: Request{Registry: "[::1]:5000", Repository: "app", Kind: KindManifest, Tag: "latest"},
			key: "[::1]:5000/app:latest"},
		{path: "/v2/" + strings.Repeat("a", 256) + "/manifests/latest", err: "repository", is: ErrNameInvalid},
		{path: "/v2/app/manifests/" + strings.Repeat("a", 129), err: "tag", is: ErrTagInvalid},
		{path: "/v2/app/tags/list", err: "want /v2/", is: ErrUnknownPath},
		{path: "/v2/", err: "want /v2/", is: ErrUnknownPath},
		{path: "/v2/app/manifests/", err: "want /v2/", is: ErrUnknownPath},
		{path: "/v2/../manifests/x", err: "repository", is: ErrNameInvalid},
		{path: "/v2/Team/app/manifests/x", err: "repository", is: ErrNameInvalid},
		{path: "/v2/localhost:5000/app/manifests/x", err: "repository", is: ErrNameInvalid},
		{path: "/v2/a__b/c-d/e.f/manifests/x", want: Request{Repository: "a__b/c-d/e.f", Kind: KindManifest, Tag: "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			got, err := ParseRequest(tt.path, tt.ns)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) || !errors.Is(err, ErrInvalid) || !errors.Is(err, tt.is) {
					t.Fatalf("error = %v, want one containing %q that is %v", err, tt.err, tt.is)
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

func TestParseList(t *testing.T) {
	tests := []struct {
		path, ns string
		ok       bool
		want     List
		is       error
	}{
		{path: "/v2/_catalog", ok: true, want: List{Kind: ListCatalog}},
		{path: "/v2/library/nginx/tags/list", ok: true, want: List{Kind: ListTags, Repository: "library/nginx"}},
		{path: "/v2/app/tags/list", ns: "10.1.2.3:5000", ok: true, want: List{Kind: ListTags, Registry: "10.1.2.3:5000", Repository: "app"}},
		{path: "/v2/a/b/referrers/" + dgst, ok: true, want: List{Kind: ListReferrers, Repository: "a/b", Subject: dgst}},
		{path: "/v2/Bad/tags/list", ok: true, is: ErrNameInvalid},
		{path: "/v2/app/tags/list", ns: "bad/host", ok: true, is: ErrNameInvalid},
		{path: "/v2/app/referrers/sha512:abc", ok: true, is: ErrDigestInvalid},
		{path: "/v2/app/referrers/latest", ok: true, is: ErrDigestInvalid},
		{path: "/v2/app/manifests/latest", ns: "bad/host"},
		{path: "/v2/app/tags/lists"},
		{path: "/v2/_catalog/x"},
		{path: "/v2/"},
	}
	for _, tt := range tests {
		t.Run(tt.path+"?"+tt.ns, func(t *testing.T) {
			got, ok, err := ParseList(tt.path, tt.ns)
			if ok != tt.ok {
				t.Fatalf("ok = %v, want %v", ok, tt.ok)
			}
			if tt.is != nil {
				if !errors.Is(err, tt.is) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("error = %v, want %v", err, tt.is)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestSplitTagKey(t *testing.T) {
	tests := []struct {
		key, registry, repo, tag string
		ok                       bool
	}{
		{key: "docker.io/library/nginx:1.27", registry: "docker.io", repo: "library/nginx", tag: "1.27", ok: true},
		{key: "10.1.2.3:5000/team/app:v1", registry: "10.1.2.3:5000", repo: "team/app", tag: "v1", ok: true},
		{key: dgst},
		{key: "nohost:v1"},
		{key: "host/app"},
		{key: "host/app:"},
	}
	for _, tt := range tests {
		reg, repo, tag, ok := SplitTagKey(tt.key)
		if ok != tt.ok || reg != tt.registry || repo != tt.repo || tag != tt.tag {
			t.Errorf("%s: got %q %q %q %v", tt.key, reg, repo, tag, ok)
		}
		if ok && TagKey(reg, repo, tag) != tt.key {
			t.Errorf("%s: does not round-trip", tt.key)
		}
	}
}

func TestIsManifestType(t *testing.T) {
	for mt, want := range map[string]bool{
		"application/vnd.oci.image.manifest.v1+json":                true,
		"application/vnd.oci.image.index.v1+json":                   true,
		"application/vnd.docker.distribution.manifest.v2+json":      true,
		"application/vnd.docker.distribution.manifest.list.v2+json": true,
		"application/vnd.oci.image.layer.v1.tar+gzip":               false,
		"application/vnd.oci.image.config.v1+json":                  false,
		"application/vnd.docker.container.image.v1+json":            false,
		"": false,
	} {
		if IsManifestType(mt) != want {
			t.Errorf("%q: %v, want %v", mt, !want, want)
		}
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
	f.Add("/v2/a/b/tags/list", "")
	f.Add("/v2/a/referrers/"+dgst, "ghcr.io")
	f.Fuzz(func(t *testing.T, path, ns string) {
		if l, ok, err := ParseList(path, ns); ok {
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("list error not ErrInvalid: %v", err)
			}
			if err == nil && l.Kind != ListCatalog && !nameRe.MatchString(l.Repository) {
				t.Fatalf("invalid repository accepted: %q", l.Repository)
			}
			if err == nil && l.Kind == ListReferrers && l.Subject.Validate() != nil {
				t.Fatalf("invalid subject accepted: %q", l.Subject)
			}
		}
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
		if req.Registry != "" && (len(req.Registry) > maxRegistry || !domainRe.MatchString(req.Registry)) {
			t.Fatalf("invalid registry accepted: %q", req.Registry)
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

// TestParseReference: a reference as a person types it on the debug page.
func TestParseReference(t *testing.T) {
	for in, want := range map[string]Image{
		"nginx":                           {Registry: "docker.io", Repository: "library/nginx", Tag: "latest"},
		" example.com/team/app:v1 ":       {Registry: "example.com", Repository: "team/app", Tag: "v1"},
		"registry:5000/app:v1@" + dgst:    {Registry: "registry:5000", Repository: "app", Digest: dgst},
		"docker.io/library/nginx@" + dgst: {Registry: "docker.io", Repository: "library/nginx", Digest: dgst},
	} {
		if got, err := ParseReference(in); err != nil || got != want {
			t.Errorf("ParseReference(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "example.com/Team/app:v1", "example.com/app:bad tag"} {
		if _, err := ParseReference(bad); err == nil {
			t.Errorf("ParseReference(%q) accepted", bad)
		}
	}
}
