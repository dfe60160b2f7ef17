// Package oci parses what arrives from outside the agent: distribution API
// paths, image references and digests, and names the keys the agent
// advertises for them.
package oci

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Kind says whether a request is for a manifest or a blob.
type Kind string

const (
	KindManifest Kind = "manifest"
	KindBlob     Kind = "blob"
)

// ErrInvalid is wrapped by every parse error here, so the registry can
// answer 400 for all of them alike.
var ErrInvalid = errors.New("invalid")

// Request is a parsed distribution API request for content.
type Request struct {
	// Registry is the upstream registry containerd is resolving against
	// (the ?ns= parameter), e.g. "docker.io"; empty when not sent.
	Registry   string
	Repository string
	Kind       Kind
	// Exactly one of Tag and Digest is set.
	Tag    string
	Digest digest.Digest
}

var (
	pathRe = regexp.MustCompile(`^/v2/(.+)/(manifests|blobs)/([^/]+)$`)
	tagRe  = regexp.MustCompile(`^[\w][\w.-]{0,127}$`)
	nameRe = regexp.MustCompile(`^` + reference.NameRegexp.String() + `$`)
)

// ParseRequest parses "/v2/<name>/(manifests|blobs)/<reference>" and the
// registry containerd names in ns.
func ParseRequest(path, ns string) (Request, error) {
	m := pathRe.FindStringSubmatch(path)
	if m == nil {
		return Request{}, fmt.Errorf("%w path %q: want /v2/<name>/manifests/<reference> or /v2/<name>/blobs/<digest>", ErrInvalid, path)
	}
	req := Request{Repository: m[1], Kind: KindManifest}
	if m[2] == "blobs" {
		req.Kind = KindBlob
	}
	if !nameRe.MatchString(req.Repository) {
		return Request{}, fmt.Errorf("%w repository name %q", ErrInvalid, req.Repository)
	}
	if ns != "" {
		if !reference.DomainRegexp.MatchString(ns) || strings.ContainsAny(ns, "/") {
			return Request{}, fmt.Errorf("%w registry %q in ns parameter", ErrInvalid, ns)
		}
		req.Registry = ns
	}
	ref := m[3]
	if strings.Contains(ref, ":") {
		d, err := ParseDigest(ref)
		if err != nil {
			return Request{}, err
		}
		req.Digest = d
		return req, nil
	}
	if req.Kind == KindBlob {
		return Request{}, fmt.Errorf("%w blob reference %q: blobs are addressed by digest", ErrInvalid, ref)
	}
	if !tagRe.MatchString(ref) {
		return Request{}, fmt.Errorf("%w tag %q", ErrInvalid, ref)
	}
	req.Tag = ref
	return req, nil
}

// Key is what the request is advertised under: the digest, or the tag key.
// A tag request without a registry has no key, since the same tag names
// different images in different registries.
func (r Request) Key() string {
	if r.Digest != "" {
		return r.Digest.String()
	}
	if r.Registry == "" {
		return ""
	}
	return TagKey(r.Registry, r.Repository, r.Tag)
}

// TagKey is the advertised key of a tag: "docker.io/library/nginx:1.27".
func TagKey(registry, repository, tag string) string {
	return registry + "/" + repository + ":" + tag
}

// ParseDigest accepts only sha256 digests, the only kind containerd's
// content store addresses by, with a clear error otherwise.
func ParseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", fmt.Errorf("%w digest %q: %v", ErrInvalid, s, err)
	}
	if d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("%w digest %q: only sha256 is supported", ErrInvalid, s)
	}
	return d, nil
}

// Image is an image name as containerd records it.
type Image struct {
	Registry   string
	Repository string
	Tag        string
	Digest     digest.Digest
}

// ParseImage parses a fully qualified image name such as
// "docker.io/library/nginx:1.27" or "10.1.2.3:5000/app@sha256:...". Short
// names are refused: containerd records images with their registry, and
// guessing one here would advertise the wrong key.
func ParseImage(s string) (Image, error) {
	named, err := reference.ParseNamed(s)
	if err != nil {
		return Image{}, fmt.Errorf("%w image name %q: %v", ErrInvalid, s, err)
	}
	img := Image{Registry: reference.Domain(named), Repository: reference.Path(named)}
	if t, ok := named.(reference.Tagged); ok {
		img.Tag = t.Tag()
	}
	if d, ok := named.(reference.Digested); ok {
		img.Digest = d.Digest()
	}
	return img, nil
}

// TagKey returns the image's tag key, or "" when it has no tag.
func (i Image) TagKey() string {
	if i.Tag == "" {
		return ""
	}
	return TagKey(i.Registry, i.Repository, i.Tag)
}

// IsDigestKey tells digest keys from tag keys.
func IsDigestKey(key string) bool {
	return strings.HasPrefix(key, "sha256:")
}

// RegistryOfKey returns the registry a tag key belongs to.
func RegistryOfKey(key string) string {
	if IsDigestKey(key) {
		return ""
	}
	registry, _, _ := strings.Cut(key, "/")
	return registry
}
