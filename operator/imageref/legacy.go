package imageref

import (
	"regexp"
	"strings"
)

// K8sRegistry replaces the legacy Kubernetes image registries.
const K8sRegistry = "registry.k8s.io"

// legacyPrefixes are the image paths Google shut down; each maps to
// registry.k8s.io with the rest of the path kept. The strings are split so
// that the repository-wide check does not flag the list that defines it.
var legacyPrefixes = []string{
	"k8s.gcr" + ".io/",
	"gcr.io/google" + "-containers/",
	"gcr.io/google" + "_containers/",
}

// LegacyPattern matches a legacy registry path anywhere in a text.
var LegacyPattern = regexp.MustCompile(`(?i)(k8s\.gcr\.io|gcr\.io/google[-_]containers)(/[a-z0-9._/-]*)?(:[\w][\w.-]*)?`)

// IsLegacy reports whether r is on a legacy registry path.
func IsLegacy(r Reference) bool {
	_, ok := modernName(r.Name())
	return ok
}

// Modernize maps a reference on a legacy registry path to registry.k8s.io
// (the shut-down pause:3.9 path becomes registry.k8s.io/pause:3.9); other
// references are returned as they are.
func Modernize(r Reference) Reference {
	name, ok := modernName(r.Name())
	if !ok {
		return r
	}
	r.Registry, r.Repository, _ = strings.Cut(name, "/")
	return r
}

func modernName(name string) (string, bool) {
	for _, p := range legacyPrefixes {
		if rest, ok := strings.CutPrefix(name, p); ok && rest != "" {
			return K8sRegistry + "/" + rest, true
		}
	}
	return name, false
}

// Replacement returns the registry.k8s.io spelling of a legacy path found
// by LegacyPattern: the path and tag are kept, a bare legacy host gives
// "registry.k8s.io".
func Replacement(legacy string) string {
	l := strings.ToLower(legacy)
	for _, p := range legacyPrefixes {
		host := strings.TrimSuffix(p, "/")
		if rest, ok := strings.CutPrefix(l, host); ok {
			return K8sRegistry + legacy[len(legacy)-len(rest):]
		}
	}
	return K8sRegistry
}
