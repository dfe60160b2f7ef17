// Package imageref parses container image references into one canonical
// form and places them under a mirror registry. The operator's imageMirror
// rewrite and the mirror-images pipeline both call Mirror, so an image is
// always pushed to exactly the path the operator later renders.
//
// Canonical form: registry/repository[:tag][@digest], where
//   - a reference without a registry is on docker.io, and a one-component
//     repository there is under library/ ("nginx" is
//     "docker.io/library/nginx"); index.docker.io and registry-1.docker.io
//     are docker.io;
//   - the registry is lower-cased and keeps its port;
//   - tag and digest are kept as given: a reference with both keeps both
//     (name:tag@digest). Runtimes pull such a reference by its digest; the
//     tag stays for people reading it. No ":latest" is added.
//
// Mirror layout: <mirror host[:port]>[/<prefix>]/<registry>/<repository>,
// where a registry port becomes "_<port>" (a path component cannot hold a
// colon, and host names cannot hold an underscore, so the mapping is
// one-to-one). Legacy registries are mapped to registry.k8s.io first.
package imageref

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/distribution/reference"
)

// ErrInvalid is wrapped by every error about a malformed reference or mirror.
var ErrInvalid = errors.New("invalid")

// DockerHub is the registry of references that name none.
const DockerHub = "docker.io"

// Reference is a parsed, canonical image reference.
type Reference struct {
	Registry   string // "docker.io", "registry.k8s.io", "127.0.0.1:5000"
	Repository string // "library/nginx"
	Tag        string // may be empty
	Digest     string // "sha256:<64 hex>", may be empty
}

var (
	anchoredRef    = regexp.MustCompile(`^` + reference.ReferenceRegexp.String() + `$`)
	anchoredDomain = regexp.MustCompile(`^` + reference.DomainRegexp.String() + `$`)
	// A repository path: lower-case components joined by single slashes,
	// each with '.', '_', '__' or dashes between alphanumerics.
	anchoredPath = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$`)
	sha256Digest = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
)

// Parse reads a reference and returns it in canonical form. Errors wrap
// ErrInvalid and say what is wrong with s.
func Parse(s string) (Reference, error) {
	if s == "" {
		return Reference{}, fmt.Errorf("%w image reference: empty", ErrInvalid)
	}
	if strings.TrimSpace(s) != s {
		return Reference{}, fmt.Errorf("%w image reference %q: leading or trailing white space", ErrInvalid, s)
	}
	if strings.Contains(s, "://") {
		return Reference{}, fmt.Errorf("%w image reference %q: drop the scheme, a reference is registry/repository[:tag][@digest]", ErrInvalid, s)
	}
	m := anchoredRef.FindStringSubmatch(s)
	if m == nil {
		return Reference{}, fmt.Errorf("%w image reference %q: %s", ErrInvalid, s, why(s))
	}
	name, tag, dgst := m[1], m[2], m[3]
	if dgst != "" && !sha256Digest.MatchString(dgst) {
		return Reference{}, fmt.Errorf("%w image reference %q: digest must be sha256:<64 lower-case hex>", ErrInvalid, s)
	}
	r := Reference{Tag: tag, Digest: dgst}
	if i := strings.IndexByte(name, '/'); i >= 0 && isRegistry(name[:i]) {
		r.Registry, r.Repository = strings.ToLower(name[:i]), name[i+1:]
	} else {
		r.Registry, r.Repository = DockerHub, name
	}
	if !anchoredPath.MatchString(r.Repository) {
		return Reference{}, fmt.Errorf("%w image reference %q: repository %q must be lower-case path components", ErrInvalid, s, r.Repository)
	}
	if strings.HasPrefix(r.Registry, "[") {
		return Reference{}, fmt.Errorf("%w image reference %q: IPv6 registry addresses are not supported here; use a host name", ErrInvalid, s)
	}
	switch r.Registry {
	case "index.docker.io", "registry-1.docker.io":
		r.Registry = DockerHub
	}
	if r.Registry == DockerHub && !strings.Contains(r.Repository, "/") {
		r.Repository = "library/" + r.Repository
	}
	if len(r.Registry)+1+len(r.Repository) > 255 {
		return Reference{}, fmt.Errorf("%w image reference %q: name longer than 255 characters", ErrInvalid, s)
	}
	return r, nil
}

// isRegistry tells a registry host from a first path component the way
// docker does: it has a dot or a port, or is localhost.
func isRegistry(s string) bool {
	return strings.ContainsAny(s, ".:") || s == "localhost" || strings.HasPrefix(s, "[")
}

// why names the most likely mistake in a reference that does not parse.
func why(s string) string {
	switch {
	case strings.ToLower(s) != s && !strings.ContainsAny(s, ":@"):
		return "repository names are lower case"
	case strings.Count(s, "@") > 1:
		return "more than one @digest"
	case strings.HasSuffix(s, ":") || strings.HasSuffix(s, "@"):
		return "empty tag or digest"
	case strings.Contains(s, "//") || strings.HasSuffix(s, "/") || strings.HasPrefix(s, "/"):
		return "empty path component"
	case strings.ContainsAny(s, " \t\n"):
		return "white space inside"
	}
	return "want [registry[:port]/]repository[:tag][@sha256:digest], repository lower case"
}

// Name is registry/repository.
func (r Reference) Name() string { return r.Registry + "/" + r.Repository }

// String is the canonical reference.
func (r Reference) String() string {
	s := r.Name()
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest
	}
	return s
}

// Canonical parses s and returns its canonical form.
func Canonical(s string) (string, error) {
	r, err := Parse(s)
	if err != nil {
		return "", err
	}
	return r.String(), nil
}

// Mirror rewrites ref to be pulled from mirror ("host[:port][/prefix]",
// trailing slashes ignored). Legacy registries become registry.k8s.io
// first. A reference already under the mirror is returned canonical but
// otherwise unchanged, so applying Mirror twice is the same as once.
func Mirror(mirror, ref string) (string, error) {
	m, err := ParseMirror(mirror)
	if err != nil {
		return "", err
	}
	r, err := Parse(ref)
	if err != nil {
		return "", err
	}
	placed := m.Place(r)
	if n := len(placed.Name()); n > 255 {
		return "", fmt.Errorf("%w image reference %q under mirror %q: the mirrored name is %d characters, the limit is 255; use a shorter mirror prefix", ErrInvalid, ref, mirror, n)
	}
	return placed.String(), nil
}

// MirrorTarget is a parsed imageMirror value.
type MirrorTarget struct {
	Host   string // "registry.corp:5000", lower case
	Prefix string // "team/mirror" or empty, without slashes at either end
}

// ParseMirror reads "host[:port][/prefix]". The host must look like a
// registry (a dot, a port, or localhost); otherwise the mirrored
// references would read as Docker Hub repositories.
func ParseMirror(s string) (MirrorTarget, error) {
	trimmed := strings.TrimRight(s, "/")
	if trimmed == "" {
		return MirrorTarget{}, fmt.Errorf("%w image mirror %q: empty; want host[:port][/prefix]", ErrInvalid, s)
	}
	if strings.Contains(trimmed, "://") {
		return MirrorTarget{}, fmt.Errorf("%w image mirror %q: drop the scheme; want host[:port][/prefix], e.g. registry.corp:5000/mirror", ErrInvalid, s)
	}
	host, prefix, _ := strings.Cut(trimmed, "/")
	if !anchoredDomain.MatchString(host) || !isRegistry(host) || strings.HasPrefix(host, "[") {
		return MirrorTarget{}, fmt.Errorf("%w image mirror %q: %q is not a registry host; want a name with a dot or a port, or localhost (IPv6 addresses are not supported)", ErrInvalid, s, host)
	}
	if prefix != "" && !anchoredPath.MatchString(prefix) {
		return MirrorTarget{}, fmt.Errorf("%w image mirror %q: path prefix %q must be lower-case path components separated by single slashes", ErrInvalid, s, prefix)
	}
	return MirrorTarget{Host: strings.ToLower(host), Prefix: prefix}, nil
}

// String is "host[:port][/prefix]".
func (m MirrorTarget) String() string {
	if m.Prefix == "" {
		return m.Host
	}
	return m.Host + "/" + m.Prefix
}

// Contains reports whether r already lives under the mirror.
func (m MirrorTarget) Contains(r Reference) bool {
	if r.Registry != m.Host {
		return false
	}
	return m.Prefix == "" || strings.HasPrefix(r.Repository+"/", m.Prefix+"/")
}

// Place returns r under the mirror (see the package comment for the layout).
func (m MirrorTarget) Place(r Reference) Reference {
	if m.Contains(r) {
		return r
	}
	r = Modernize(r)
	repo := Path(r)
	if m.Prefix != "" {
		repo = m.Prefix + "/" + repo
	}
	return Reference{Registry: m.Host, Repository: repo, Tag: r.Tag, Digest: r.Digest}
}

// Path is where r lives under any mirror, without the mirror's own host
// and prefix: "docker.io/library/nginx", "127.0.0.1_5000/team/app".
func Path(r Reference) string {
	return strings.ReplaceAll(r.Registry, ":", "_") + "/" + r.Repository
}
