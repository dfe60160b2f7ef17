// Package policy says which content stays off the peer network: private
// registries, whose content is neither advertised nor served to peers, and
// upstream-only tags, which always resolve at the registry (mutable tags
// such as latest, whose answer from a peer could be an older image).
package policy

import (
	"fmt"
	"slices"
	"strings"

	"github.com/fleetmirror/fleetmirror/agent/oci"
)

// Policy is the agent's sharing policy; the zero value shares everything.
type Policy struct {
	private  []string
	upstream []tagPattern
}

// tagPattern matches tag references; empty fields match anything.
type tagPattern struct {
	registry, repository, tag string
}

// maxEntries bounds each list: they are written by hand.
const maxEntries = 256

// New parses the lists of --private-registries (registry hosts, with
// their port if they have one) and --upstream-tags. An upstream-tags entry
// is ":tag" (that tag in every repository), "registry" (every tag of a
// registry), "registry/repository" (every tag of a repository) or
// "registry/repository:tag" (one tag).
func New(private, upstreamTags []string) (*Policy, error) {
	if len(private) > maxEntries || len(upstreamTags) > maxEntries {
		return nil, fmt.Errorf("at most %d private registries and %d upstream tags", maxEntries, maxEntries)
	}
	p := &Policy{}
	for _, h := range private {
		h = strings.TrimSpace(h)
		if h == "" || strings.ContainsAny(h, "/@ ") {
			return nil, fmt.Errorf("--private-registries %q: want a registry host such as registry.corp.example or ghcr.io (no scheme, no path)", h)
		}
		p.private = append(p.private, normalize(h))
	}
	for _, e := range upstreamTags {
		t, err := parseTagPattern(strings.TrimSpace(e))
		if err != nil {
			return nil, err
		}
		p.upstream = append(p.upstream, t)
	}
	return p, nil
}

func parseTagPattern(e string) (tagPattern, error) {
	bad := func(why string) (tagPattern, error) {
		return tagPattern{}, fmt.Errorf("--upstream-tags %q: %s; want :tag, registry, registry/repository or registry/repository:tag", e, why)
	}
	if e == "" {
		return bad("empty entry")
	}
	if strings.HasPrefix(e, ":") {
		if !validTag(e[1:]) {
			return bad("not a tag")
		}
		return tagPattern{tag: e[1:]}, nil
	}
	reg, rest, hasRepo := strings.Cut(e, "/")
	if strings.Contains(reg, ":") && !hasRepo {
		// "host:port" alone is a registry, not a repository with a tag.
		return tagPattern{registry: normalize(reg)}, nil
	}
	if !hasRepo {
		return tagPattern{registry: normalize(reg)}, nil
	}
	t := tagPattern{registry: normalize(reg), repository: rest}
	if i := strings.LastIndexByte(rest, ':'); i >= 0 {
		t.repository, t.tag = rest[:i], rest[i+1:]
		if !validTag(t.tag) {
			return bad("not a tag after the last ':'")
		}
	}
	if t.repository == "" || strings.ContainsAny(t.repository, "@ ") {
		return bad("not a repository")
	}
	return t, nil
}

func validTag(t string) bool {
	return t != "" && len(t) <= 128 && !strings.ContainsAny(t, "/:@ ")
}

// normalize spells registries as keys do: Docker Hub as docker.io.
func normalize(host string) string {
	switch host {
	case "index.docker.io", "registry-1.docker.io":
		return "docker.io"
	}
	return host
}

// Private reports whether registry's content stays off the peer network.
func (p *Policy) Private(registry string) bool {
	return p != nil && slices.Contains(p.private, normalize(registry))
}

// UpstreamTag reports whether a tag must always resolve at its registry.
func (p *Policy) UpstreamTag(registry, repository, tag string) bool {
	if p == nil {
		return false
	}
	registry = normalize(registry)
	for _, t := range p.upstream {
		if (t.registry == "" || t.registry == registry) &&
			(t.repository == "" || t.repository == repository) &&
			(t.tag == "" || t.tag == tag) {
			return true
		}
	}
	return false
}

// Shared reports whether a request may be answered from or through peers:
// not for a private registry's content, nor for an upstream-only tag (its
// digests are still shared: they name the same bytes everywhere).
func (p *Policy) Shared(req oci.Request) bool {
	if p.Private(req.Registry) {
		return false
	}
	return req.Tag == "" || !p.UpstreamTag(req.Registry, req.Repository, req.Tag)
}

// SharedImage reports whether an image of the node's store (a containerd
// image name such as docker.io/library/nginx:1.27) may be advertised.
func (p *Policy) SharedImage(name string) bool {
	img, err := oci.ParseImage(name)
	if err != nil {
		return true
	}
	return !p.Private(img.Registry)
}

// SharedKey reports whether a routing key may be advertised: tag keys of
// private registries and upstream-only tags are not.
func (p *Policy) SharedKey(key string) bool {
	if p == nil || oci.IsDigestKey(key) {
		return true
	}
	reg, repo, tag, ok := oci.SplitTagKey(key)
	if !ok {
		return true
	}
	return !p.Private(reg) && !p.UpstreamTag(reg, repo, tag)
}
