// Package hosts writes containerd's registry host configuration
// (<certsDir>/<registry>/hosts.toml, the "config_path" format of containerd
// 1.6+ and 2.x) so that containerd asks the fleetmirror agent(s) for content
// before it falls back to the upstream registry.
//
// containerd re-reads hosts.toml on every pull, so no restart is needed and
// files are replaced atomically. Files we write carry a marker comment so we
// can tell them apart from a user's; a user's file is backed up before we
// replace it and restored by Cleanup.
package hosts

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

const (
	// DefaultCertsDir is where containerd is conventionally configured
	// (config_path) to look for hosts.toml files.
	DefaultCertsDir = "/etc/containerd/certs.d"

	// DefaultDialTimeout keeps the penalty small when the local mirror is
	// down: containerd's own default is 30s per attempt.
	DefaultDialTimeout = 200 * time.Millisecond

	// FileName is the file containerd reads in each registry directory.
	FileName = "hosts.toml"

	// BackupSuffix is appended to FileName for the copy of a user's file
	// that we replaced, so Cleanup can put it back byte for byte.
	BackupSuffix = ".fleetmirror-backup"

	// DefaultDir is containerd's fallback directory, used for any registry
	// that has no directory of its own.
	DefaultDir = "_default"
)

// Config describes the hosts.toml files to write.
type Config struct {
	// CertsDir is containerd's config_path, e.g. DefaultCertsDir.
	CertsDir string
	// MirrorTargets are the agent URLs containerd should try first, in
	// order, e.g. "http://127.0.0.1:30120".
	MirrorTargets []string
	// Registries are the upstream registry URLs to mirror, e.g.
	// "https://docker.io" or "http://10.1.2.3:5000". Empty means every
	// registry, through the _default directory.
	Registries []string
	// DialTimeout bounds containerd's connection attempt to each mirror
	// target so a dead agent costs little. Zero leaves containerd's default.
	DialTimeout time.Duration
	// Prepend keeps an existing hosts.toml: our mirror targets come first,
	// followed by the hosts (and server settings) that were already there.
	Prepend bool
	// Canary, when set, is a registry name only the agent serves (see
	// agent/canary): its hosts.toml names the first mirror target as host
	// and as server, so containerd never asks anyone else for it.
	Canary string
}

// Registry is one mirrored registry after validation.
type Registry struct {
	// Host is the registry as it appears in image references, e.g.
	// "docker.io" or "10.1.2.3:5000"; empty for the _default catch-all.
	Host string
	// Server is the upstream URL containerd falls back to after the
	// mirrors, e.g. "https://registry-1.docker.io"; empty for _default,
	// where containerd uses the image's own registry.
	Server string
	// Dir is the directory name under CertsDir, e.g. "10.1.2.3_5000_".
	Dir string
}

// dockerHubServer is where containerd itself sends docker.io requests; the
// name docker.io does not serve the registry API.
const dockerHubServer = "https://registry-1.docker.io"

// ParseRegistry validates a registry URL such as "https://ghcr.io" and
// works out its directory and upstream server.
func ParseRegistry(raw string) (Registry, error) {
	u, err := parseBaseURL("registry", raw)
	if err != nil {
		return Registry{}, err
	}
	r := Registry{Host: u.Host, Server: u.Scheme + "://" + u.Host, Dir: HostDir(u.Host)}
	if u.Host == "docker.io" {
		if u.Scheme != "https" {
			return Registry{}, fmt.Errorf("registry %q: docker.io is only served over https; use \"https://docker.io\"", raw)
		}
		r.Server = dockerHubServer
	}
	return r, nil
}

// HostDir returns the directory of a registry host under certs.d. It is the
// host as written, "10.1.2.3:5000" included: containerd 1.6 reads only that
// form, while 1.7 and 2.x also try "host_port_" first.
func HostDir(host string) string {
	return host
}

// parseBaseURL accepts only scheme://host[:port] because containerd's
// directories are per registry host: a path cannot be mirrored separately.
func parseBaseURL(what, raw string) (*url.URL, error) {
	s := strings.TrimSpace(raw)
	if s == "" {
		return nil, fmt.Errorf("%s URL is empty; use e.g. \"https://ghcr.io\"", what)
	}
	if !strings.Contains(s, "://") {
		return nil, fmt.Errorf("%s %q: missing scheme; use \"https://%s\" (or \"http://%s\" for plain HTTP)", what, raw, s, s)
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%s %q: not a valid URL: %w", what, raw, err)
	}
	u.Scheme = strings.ToLower(u.Scheme)
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("%s %q: scheme %q is not supported; use http:// or https://", what, raw, u.Scheme)
	}
	if u.Host == "" || u.Hostname() == "" {
		return nil, fmt.Errorf("%s %q: host is missing; use e.g. \"%s://ghcr.io\"", what, raw, u.Scheme)
	}
	if u.User != nil {
		return nil, fmt.Errorf("%s %q: credentials in the URL are not supported; remove %q", what, raw, u.User.String()+"@")
	}
	if u.Path != "" && u.Path != "/" || u.RawPath != "" {
		return nil, fmt.Errorf("%s %q: must not have a path (%q); containerd configures whole registry hosts, use \"%s://%s\"", what, raw, u.Path, u.Scheme, u.Host)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return nil, fmt.Errorf("%s %q: must not have a query or fragment; use \"%s://%s\"", what, raw, u.Scheme, u.Host)
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("%s %q: port %q must be between 1 and 65535", what, raw, p)
		}
	} else if strings.HasSuffix(u.Host, ":") {
		return nil, fmt.Errorf("%s %q: empty port; remove the trailing \":\"", what, raw)
	}
	if strings.ContainsAny(u.Host, "\"\\'/ \t") {
		return nil, fmt.Errorf("%s %q: invalid character in host %q", what, raw, u.Host)
	}
	return u, nil
}

// plan is a validated Config.
type plan struct {
	mirrors    []string
	registries []Registry
	canary     *Registry
}

// Validate reports the first problem with cfg's mirror targets, registries
// and dial timeout. It does not look at CertsDir.
func (cfg Config) Validate() error {
	_, err := cfg.plan()
	return err
}

func (cfg Config) plan() (plan, error) {
	var p plan
	if len(cfg.MirrorTargets) == 0 {
		return p, errors.New("no mirror targets: set at least one agent URL, e.g. \"http://127.0.0.1:30120\"")
	}
	if cfg.DialTimeout < 0 {
		return p, fmt.Errorf("dial timeout %s is negative; use e.g. %s, or 0 for containerd's default", cfg.DialTimeout, DefaultDialTimeout)
	}
	seen := map[string]string{}
	for _, raw := range cfg.MirrorTargets {
		u, err := parseBaseURL("mirror target", raw)
		if err != nil {
			return p, err
		}
		s := u.Scheme + "://" + u.Host
		if prev, ok := seen[s]; ok {
			return p, fmt.Errorf("mirror target %q duplicates %q; list each agent once", raw, prev)
		}
		seen[s] = raw
		p.mirrors = append(p.mirrors, s)
	}
	if cfg.Canary != "" {
		if strings.ContainsAny(cfg.Canary, ":/\\\"' \t") || strings.HasPrefix(cfg.Canary, ".") {
			return p, fmt.Errorf("canary registry %q: want a plain host name", cfg.Canary)
		}
		p.canary = &Registry{Host: cfg.Canary, Server: p.mirrors[0], Dir: HostDir(cfg.Canary)}
	}
	if len(cfg.Registries) == 0 {
		p.registries = []Registry{{Dir: DefaultDir}}
		return p, nil
	}
	dirs := map[string]string{}
	for _, raw := range cfg.Registries {
		r, err := ParseRegistry(raw)
		if err != nil {
			return p, err
		}
		if prev, ok := dirs[r.Dir]; ok {
			return p, fmt.Errorf("registry %q and %q both configure %s; keep one (a registry host has a single scheme)", prev, raw, r.Dir)
		}
		if p.canary != nil && r.Dir == p.canary.Dir {
			return p, fmt.Errorf("registry %q is the canary's name, which only the agent serves; remove it", raw)
		}
		dirs[r.Dir] = raw
		p.registries = append(p.registries, r)
	}
	return p, nil
}
