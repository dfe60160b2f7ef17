// Package oci parses what arrives from outside the agent: distribution API
// paths, image references and digests, and names the keys the agent
// advertises for them.
package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Kind says whether a request is for a manifest or a blob.
type Kind string

const (
	KindManifest Kind = "manifest"
	KindBlob     Kind = "blob"
)

// ErrInvalid is wrapped by every parse error here; the errors below it
// tell the registry which distribution error code to answer with.
var ErrInvalid = errors.New("invalid")

var (
	// ErrDigestInvalid: a malformed or non-sha256 digest (DIGEST_INVALID).
	ErrDigestInvalid = fmt.Errorf("%w digest", ErrInvalid)
	// ErrNameInvalid: a malformed repository or registry name (NAME_INVALID).
	ErrNameInvalid = fmt.Errorf("%w name", ErrInvalid)
	// ErrTagInvalid: a reference that is neither a digest nor a valid tag,
	// so it names no manifest.
	ErrTagInvalid = fmt.Errorf("%w tag", ErrInvalid)
	// ErrUnknownPath: no distribution API endpoint this agent serves.
	ErrUnknownPath = fmt.Errorf("%w path", ErrInvalid)
)

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
	// The distribution spec's <name>: path components only. A domain is
	// never part of it (the ns parameter names the registry).
	nameRe = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$`)
	// reference.DomainRegexp is unanchored: it would accept any value
	// holding one letter or digit.
	domainRe = regexp.MustCompile(`^(?:` + reference.DomainRegexp.String() + `)$`)
)

// maxRegistry bounds the ns parameter: a DNS name (253) and a port.
const maxRegistry = 255

// ParseRequest parses "/v2/<name>/(manifests|blobs)/<reference>" and the
// registry containerd names in ns.
func ParseRequest(path, ns string) (Request, error) {
	m := pathRe.FindStringSubmatch(path)
	if m == nil {
		return Request{}, fmt.Errorf("%w %q: want /v2/<name>/manifests/<reference> or /v2/<name>/blobs/<digest>", ErrUnknownPath, path)
	}
	req := Request{Repository: m[1], Kind: KindManifest}
	if m[2] == "blobs" {
		req.Kind = KindBlob
	}
	if err := checkName(req.Repository); err != nil {
		return Request{}, err
	}
	if ns != "" {
		if err := checkRegistry(ns); err != nil {
			return Request{}, err
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
		return Request{}, fmt.Errorf("%w %q: blobs are addressed by digest", ErrDigestInvalid, ref)
	}
	if !tagRe.MatchString(ref) {
		return Request{}, fmt.Errorf("%w %q: a reference is a digest or a tag of [A-Za-z0-9_.-], at most 128, not starting with . or -", ErrTagInvalid, ref)
	}
	req.Tag = ref
	return req, nil
}

func checkName(name string) error {
	if len(name) > 255 || !nameRe.MatchString(name) {
		return fmt.Errorf("%w: repository %q", ErrNameInvalid, name)
	}
	return nil
}

func checkRegistry(ns string) error {
	if len(ns) > maxRegistry || !domainRe.MatchString(ns) {
		return fmt.Errorf("%w: registry %q in ns parameter", ErrNameInvalid, ns)
	}
	return nil
}

// ListKind names the endpoints that list rather than serve content.
type ListKind string

const (
	ListTags      ListKind = "tags"
	ListReferrers ListKind = "referrers"
	ListCatalog   ListKind = "catalog"
)

// List is a request to a listing endpoint. The agent answers these from
// its own store (or refuses them) and never asks peers: a list is of one
// node's content, not the cluster's.
type List struct {
	Kind       ListKind
	Registry   string        // the ns parameter; empty when not sent
	Repository string        // empty for the catalog
	Subject    digest.Digest // referrers only
}

var (
	tagsRe      = regexp.MustCompile(`^/v2/(.+)/tags/list$`)
	referrersRe = regexp.MustCompile(`^/v2/(.+)/referrers/([^/]+)$`)
)

// ParseList parses "/v2/_catalog", "/v2/<name>/tags/list" and
// "/v2/<name>/referrers/<digest>", with the registry containerd names in
// ns; ok is false for any other path.
func ParseList(path, ns string) (l List, ok bool, err error) {
	if path == "/v2/_catalog" {
		return List{Kind: ListCatalog}, true, nil
	}
	if m := tagsRe.FindStringSubmatch(path); m != nil {
		if err := checkListName(m[1], ns); err != nil {
			return List{}, true, err
		}
		return List{Kind: ListTags, Registry: ns, Repository: m[1]}, true, nil
	}
	if m := referrersRe.FindStringSubmatch(path); m != nil {
		if err := checkListName(m[1], ns); err != nil {
			return List{}, true, err
		}
		d, err := ParseDigest(m[2])
		if err != nil {
			return List{}, true, err
		}
		return List{Kind: ListReferrers, Registry: ns, Repository: m[1], Subject: d}, true, nil
	}
	return List{}, false, nil
}

func checkListName(name, ns string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if ns != "" {
		return checkRegistry(ns)
	}
	return nil
}

// SplitTagKey splits a tag key into its registry, repository and tag; ok
// is false for digest keys and anything else that is not a tag key.
func SplitTagKey(key string) (registry, repository, tag string, ok bool) {
	if IsDigestKey(key) {
		return "", "", "", false
	}
	registry, rest, ok := strings.Cut(key, "/")
	if !ok {
		return "", "", "", false
	}
	// The repository holds no ':', so the last one starts the tag.
	i := strings.LastIndexByte(rest, ':')
	if i <= 0 || i == len(rest)-1 {
		return "", "", "", false
	}
	return registry, rest[:i], rest[i+1:], true
}

// ManifestTypes are the media types of manifests and indexes, in the
// order containerd lists them when it asks for a manifest: what the
// manifests endpoint serves. Anything else the store holds (configs,
// layers) is a blob, served only as one.
var ManifestTypes = []string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

// IsManifestType tells manifest and index media types from blob ones.
func IsManifestType(mediaType string) bool {
	return slices.Contains(ManifestTypes, mediaType)
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
		return "", fmt.Errorf("%w %q: %v", ErrDigestInvalid, s, err)
	}
	if d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("%w %q: only sha256 is supported", ErrDigestInvalid, s)
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

// ParseReference parses an image reference as a person types it: a short
// name is expanded as docker does ("nginx" is
// docker.io/library/nginx:latest), and a digest, when there is one, wins
// over the tag.
func ParseReference(s string) (Image, error) {
	named, err := reference.ParseDockerRef(strings.TrimSpace(s))
	if err != nil {
		return Image{}, fmt.Errorf("image reference %q: %v", s, err)
	}
	return ParseImage(named.String())
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

// Children lists what a manifest or an index names: an index's manifests,
// a manifest's config and layers. One struct covers OCI and Docker indexes
// and manifests alike; the fields a kind lacks stay empty.
func Children(body []byte) ([]ocispec.Descriptor, error) {
	var m struct {
		Manifests []ocispec.Descriptor `json:"manifests"`
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, fmt.Errorf("%w manifest: %w", ErrInvalid, err)
	}
	kids := slices.Clone(m.Manifests)
	if m.Config != nil {
		kids = append(kids, *m.Config)
	}
	return append(kids, m.Layers...), nil
}
