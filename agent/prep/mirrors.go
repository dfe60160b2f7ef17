package prep

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"sort"
	"strings"
)

// HostsFile is a hosts.toml that takes over an inline registry mirror
// (CRI's deprecated `registry.mirrors` table), which containerd does not
// accept beside config_path.
type HostsFile struct {
	// Registry is the mirrors key: "docker.io", "10.0.0.1:5000" or "*".
	Registry string
	// Dir is the folder under CertsDir: the registry, or _default for "*".
	Dir string
	// Table is the mirrors table it came from, for messages.
	Table   []string
	Content []byte
	// Exists: an identical file is already there (an earlier run that
	// stopped before the config was written); set by Check.
	Exists bool
	// AsBackup: the agent's own hosts.toml is there already, so the file
	// goes where the agent keeps the file it replaced, which it puts after
	// its own hosts on its next write (--prepend-existing) and restores on
	// cleanup; set by Check.
	AsBackup bool
}

// Path is where the file goes on the host.
func (h HostsFile) Path(certsDir string) string {
	return filepath.Join(certsDir, h.Dir, "hosts.toml")
}

// defaultDir is containerd's folder for registries without their own.
const defaultDir = "_default"

// hostsHeader marks files prep wrote; the agent's own marker differs, so
// with --prepend-existing the agent keeps these hosts after its own.
const hostsHeader = "# Migrated by fleetmirror containerd-prep from the inline mirror in containerd's config.toml:\n"

// migrateMirrors turns each entry of an inline mirrors table into the
// hosts.toml that makes containerd try the same hosts in the same order.
//
// containerd 1.6/1.7 (pkg/cri/server/image_pull.go, registryEndpoints and
// registryHosts) resolve a pull from registry R with inline mirrors as:
// the endpoints of mirrors[R], or of mirrors["*"] when R has no entry, in
// order; an endpoint without a scheme gets http for localhost and loopback
// addresses, https otherwise; an endpoint without a path gets /v2, one with
// a path is used as given; then R's default host (registry-1.docker.io for
// docker.io), unless some endpoint's host is R itself. Every host may pull
// and resolve, nothing else.
//
// hosts.toml (remotes/docker/config/hosts.go) tries the [host] entries in
// file order, each with /v2 appended to its path, then `server`, which
// defaults to R's default host; <dir>/_default serves registries without a
// folder of their own (containerd 1.7, and 1.6 releases since late 2022:
// containerd/containerd#7607). So: the endpoints become hosts in order with
// capabilities pull and resolve, and server is R's default host, or, when
// an endpoint names R itself (no fallback then), the last endpoint.
//
// Anything this cannot carry over exactly is refused: rewrite rules (no
// hosts.toml equivalent in containerd 1.x), endpoints with a path (used as
// given inline, /v2 appended in hosts.toml), queries, user info, schemes
// other than http and https, and keys this code does not know.
func migrateMirrors(table []string, mirrors map[string]any, certsDir string) ([]HostsFile, error) {
	names := make([]string, 0, len(mirrors))
	for n := range mirrors {
		names = append(names, n)
	}
	sort.Strings(names)
	var files []HostsFile
	for _, name := range names {
		where := displayTable(append(append([]string{}, table...), "mirrors", name))
		entry, ok := mirrors[name].(map[string]any)
		if !ok {
			return nil, refuse("%s is not a table; fix it by hand", where)
		}
		for k := range entry {
			switch k {
			case "endpoint":
			case "rewrite":
				return nil, refuse("%s has `rewrite` rules, which hosts.toml cannot express the same way; move this mirror to %s by hand (or drop the rewrite) and remove the table",
					where, filepath.Join(certsDir, hostsDir(name), "hosts.toml"))
			default:
				return nil, refuse("%s has the key %q, which prep does not know how to carry over; move this mirror to %s by hand and remove the table", where, k, filepath.Join(certsDir, hostsDir(name), "hosts.toml"))
			}
		}
		var endpoints []string
		switch v := entry["endpoint"].(type) {
		case nil:
		case []any:
			for _, e := range v {
				s, ok := e.(string)
				if !ok {
					return nil, refuse("%s endpoint holds %#v, not a string; fix it by hand", where, e)
				}
				endpoints = append(endpoints, s)
			}
		default:
			return nil, refuse("%s endpoint is %#v, not a list of URLs; fix it by hand", where, v)
		}
		if name == "*" && len(endpoints) == 0 {
			// Every registry goes to its own default host: what no
			// _default folder means too.
			continue
		}
		f, err := renderMirror(name, endpoints, where, certsDir)
		if err != nil {
			return nil, err
		}
		f.Table = append(append([]string{}, table...), "mirrors", name)
		files = append(files, f)
	}
	return files, nil
}

func hostsDir(name string) string {
	if name == "*" {
		return defaultDir
	}
	return name
}

func renderMirror(name string, endpoints []string, where, certsDir string) (HostsFile, error) {
	if name != "*" {
		if u, err := url.Parse("dummy://" + name); err != nil || u.Host != name || name == "" {
			return HostsFile{}, refuse("%s: %q is not a registry host (host or host:port); fix the table name by hand", where, name)
		}
	}
	var hosts []string
	selfListed := false
	for _, e := range endpoints {
		u, err := endpointURL(e)
		if err != nil {
			return HostsFile{}, refuse("%s endpoint %q %s; move this mirror to %s by hand and remove the table", where, e, err, filepath.Join(certsDir, hostsDir(name), "hosts.toml"))
		}
		hosts = append(hosts, u.Scheme+"://"+u.Host)
		if u.Host == name {
			selfListed = true
		}
	}
	var b strings.Builder
	b.WriteString(hostsHeader)
	fmt.Fprintf(&b, "# %s\n", where)
	var server string
	switch {
	case name == "*":
		// No server: containerd falls back to the pulled registry's own
		// default host, as the inline "*" did.
	case selfListed:
		// containerd added no fallback: the last endpoint is the last try.
		server, hosts = hosts[len(hosts)-1], hosts[:len(hosts)-1]
	default:
		def := name
		if name == "docker.io" {
			def = "registry-1.docker.io"
		}
		server = defaultScheme(def) + "://" + def
	}
	if len(hosts) == 0 {
		// containerd 1.6 and 1.7 without containerd/containerd#10028 fail
		// every pull on a hosts.toml without [host] entries ("invalid
		// `host` tree", #10027): list the server as a host too. After a
		// failure it is tried once more, the only difference.
		hosts = []string{server}
	}
	if server != "" {
		fmt.Fprintf(&b, "server = %q\ncapabilities = [\"pull\", \"resolve\"]\n", server)
	}
	for _, h := range hosts {
		fmt.Fprintf(&b, "\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", h)
	}
	return HostsFile{Registry: name, Dir: hostsDir(name), Content: []byte(b.String())}, nil
}

// endpointURL reads an inline endpoint as containerd 1.x did, and fails
// where hosts.toml would read it differently.
func endpointURL(e string) (*url.URL, error) {
	if !strings.Contains(e, "://") {
		host := e
		if i := strings.IndexAny(host, "/?#"); i >= 0 {
			host = host[:i]
		}
		e = defaultScheme(host) + "://" + e
	}
	u, err := url.Parse(e)
	switch {
	case err != nil:
		return nil, fmt.Errorf("does not parse (%v)", err)
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, fmt.Errorf("has the scheme %q; containerd pulls over http or https only", u.Scheme)
	case u.Host == "":
		return nil, fmt.Errorf("names no host")
	case u.Path != "" || u.RawPath != "":
		return nil, fmt.Errorf("has a path, which containerd 1.x uses as given while hosts.toml appends /v2 to it")
	case u.RawQuery != "" || u.Fragment != "" || u.User != nil || u.Opaque != "":
		return nil, fmt.Errorf("has a query, fragment or user info, which hosts.toml has no place for")
	}
	return u, nil
}

// defaultScheme is containerd 1.x's scheme for an endpoint without one:
// plain http for localhost and loopback addresses.
func defaultScheme(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if host == "localhost" {
		return "http"
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return "http"
	}
	return "https"
}
