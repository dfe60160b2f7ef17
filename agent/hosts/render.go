package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"path"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/fleetmirror/fleetmirror/agent/internal/tomlstr"
)

// markerLine starts every file we write; it is how Write and Cleanup know a
// hosts.toml is ours to overwrite or delete. The created-dir variant also
// records that we made the directory, so only then do we remove it.
const (
	markerLine           = "# managed-by: fleetmirror"
	markerLineCreatedDir = markerLine + "; created-dir"
	headerNote           = "# Written by the fleetmirror agent; edits are overwritten. A replaced file is kept as " +
		FileName + BackupSuffix + " and restored on cleanup.\n"
)

// isOurs reports whether a hosts.toml was written by us.
func isOurs(b []byte) bool {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	s := strings.TrimSuffix(string(line), "\r")
	return s == markerLine || s == markerLineCreatedDir
}

// IsAgentFile reports whether a hosts.toml is one the agent wrote (and
// rewrites from its backup, the file it replaced, on every Write).
func IsAgentFile(b []byte) bool { return isOurs(b) }

// createdDirFlag reports whether one of our files says we created its directory.
func createdDirFlag(b []byte) bool {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	return strings.TrimSuffix(string(line), "\r") == markerLineCreatedDir
}

// Render returns the hosts.toml files for cfg keyed by slash-separated path
// relative to CertsDir (e.g. "docker.io/hosts.toml"), without touching the
// disk. It is for printing node user data, so CertsDir and Prepend are
// ignored: there is no existing file to keep.
func Render(cfg Config) (map[string][]byte, error) {
	p, err := cfg.plan()
	if err != nil {
		return nil, err
	}
	out := make(map[string][]byte, len(p.registries))
	for _, r := range p.registries {
		b, err := renderFile(p.mirrors, cfg.DialTimeout, r, nil, false)
		if err != nil {
			return nil, err
		}
		out[path.Join(r.Dir, FileName)] = b
	}
	return out, nil
}

// existing is a parsed hosts.toml whose settings Prepend keeps.
type existing struct {
	// root holds every top-level key except "host": server and the
	// server's own settings (capabilities, ca, header, ...).
	root map[string]any
	// hosts are the [host."..."] entries in the order containerd tries them.
	hosts []hostEntry
}

type hostEntry struct {
	key string
	cfg map[string]any
}

// hostFileConfig mirrors containerd's struct of the same name
// (core/remotes/docker/config/hosts.go) field for field, so decoding into it
// fails exactly when containerd's decoding fails.
type hostFileConfig struct {
	Capabilities []string       `toml:"capabilities"`
	CACert       any            `toml:"ca"`
	Client       any            `toml:"client"`
	SkipVerify   *bool          `toml:"skip_verify"`
	Header       map[string]any `toml:"header"`
	OverridePath bool           `toml:"override_path"`
	DialTimeout  string         `toml:"dial_timeout"`
}

type rootFileConfig struct {
	hostFileConfig
	Server      string                    `toml:"server"`
	HostConfigs map[string]hostFileConfig `toml:"host"`
}

// parseExisting decodes a hosts.toml for Prepend. It rejects anything
// containerd would reject, because containerd ignores the whole file on
// any error, which would silently drop our mirror too.
func parseExisting(b []byte) (*existing, error) {
	var typed rootFileConfig
	if err := toml.Unmarshal(b, &typed); err != nil {
		return nil, describeTOMLError(err)
	}
	var generic map[string]any
	if err := toml.Unmarshal(b, &generic); err != nil {
		return nil, describeTOMLError(err)
	}
	order, err := hostOrder(b)
	if err != nil {
		return nil, err
	}
	ex := &existing{root: generic}
	hostTable, _ := generic["host"].(map[string]any)
	delete(ex.root, "host")
	if err := checkHostConfig("server", typed.Server, typed.hostFileConfig); err != nil {
		return nil, err
	}
	for _, key := range order {
		if err := checkHostConfig("host", key, typed.HostConfigs[key]); err != nil {
			return nil, err
		}
		cfg, _ := hostTable[key].(map[string]any)
		if cfg == nil {
			cfg = map[string]any{}
		}
		ex.hosts = append(ex.hosts, hostEntry{key: key, cfg: cfg})
	}
	return ex, nil
}

func describeTOMLError(err error) error {
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("invalid TOML at line %d, column %d: %w", row, col, err)
	}
	return fmt.Errorf("invalid TOML: %w", err)
}

// hostOrder lists host keys in file order the way containerd does: from
// [host."..."] table headers (including sub-tables such as
// [host."...".header]). Hosts defined only with inline or dotted keys are
// not listed, and containerd never tries them, so neither do we. Unlike
// containerd we drop non-consecutive repeats, since each host becomes one
// table.
func hostOrder(b []byte) ([]string, error) {
	var p unstable.Parser
	p.Reset(b)
	var order []string
	seen := map[string]bool{}
	last := ""
	for p.NextExpression() {
		e := p.Expression()
		if e.Kind != unstable.Table {
			continue
		}
		var parts []string
		for it := e.Key(); it.Next(); {
			parts = append(parts, string(it.Node().Data))
		}
		// As in containerd, "last" starts empty, so a [host.""] table is
		// skipped unless another host precedes it.
		if len(parts) < 2 || parts[0] != "host" || parts[1] == last {
			continue
		}
		last = parts[1]
		if !seen[last] {
			seen[last] = true
			order = append(order, last)
		}
	}
	if err := p.Error(); err != nil {
		return nil, fmt.Errorf("invalid TOML: %w", err)
	}
	return order, nil
}

// checkHostConfig repeats the checks of containerd's parseHostConfig.
func checkHostConfig(what, server string, c hostFileConfig) error {
	name := fmt.Sprintf("%s %q", what, server)
	if server != "" {
		s := server
		if !strings.HasPrefix(s, "http") {
			s = "https://" + s
		}
		if _, err := url.Parse(s); err != nil {
			return fmt.Errorf("%s: unparsable URL: %w", name, err)
		}
	}
	for _, c := range c.Capabilities {
		switch strings.ToLower(c) {
		case "pull", "resolve", "push", "referrers":
		default:
			return fmt.Errorf("%s: unknown capability %q (containerd knows pull, resolve, push, referrers)", name, c)
		}
	}
	if c.CACert != nil && !stringOrStrings(c.CACert) {
		return fmt.Errorf("%s: \"ca\" must be a string or a list of strings", name)
	}
	if c.Client != nil && !clientPaths(c.Client) {
		return fmt.Errorf("%s: \"client\" must be a path, a list of paths or a list of [cert, key] pairs", name)
	}
	for k, v := range c.Header {
		if !stringOrStrings(v) {
			return fmt.Errorf("%s: header %q must be a string or a list of strings", name, k)
		}
	}
	if c.DialTimeout != "" {
		if _, err := time.ParseDuration(c.DialTimeout); err != nil {
			return fmt.Errorf("%s: dial_timeout: %w", name, err)
		}
	}
	return nil
}

// stringOrStrings reports whether v, as decoded from TOML, is a string or
// a list of strings.
func stringOrStrings(v any) bool {
	switch v := v.(type) {
	case string:
		return true
	case []any:
		return allStrings(v)
	}
	return false
}

// clientPaths reports whether v is what containerd takes for "client": a
// path, or a list of paths and [cert, key] pairs.
func clientPaths(v any) bool {
	switch v := v.(type) {
	case string:
		return true
	case []any:
		for _, pair := range v {
			if p, ok := pair.([]any); ok {
				if len(p) != 2 || !allStrings(p) {
					return false
				}
			} else if _, ok := pair.(string); !ok {
				return false
			}
		}
		return true
	}
	return false
}

func allStrings(v []any) bool {
	for _, x := range v {
		if _, ok := x.(string); !ok {
			return false
		}
	}
	return true
}

// implicitServer is the upstream containerd uses for r when hosts.toml has
// no server: https://<host>, except docker.io.
func implicitServer(r Registry) string {
	if r.Host == "docker.io" {
		return dockerHubServer
	}
	if r.Host == "" {
		return ""
	}
	return "https://" + r.Host
}

// renderFile produces one hosts.toml. Output depends only on the arguments
// (maps are emitted sorted), so an unchanged config yields identical bytes
// and Write can skip the rewrite.
func renderFile(mirrors []string, dial time.Duration, r Registry, ex *existing, createdDir bool) ([]byte, error) {
	var b bytes.Buffer
	if createdDir {
		b.WriteString(markerLineCreatedDir + "\n")
	} else {
		b.WriteString(markerLine + "\n")
	}
	b.WriteString(headerNote)
	if err := renderServer(&b, r, ex); err != nil {
		return nil, err
	}
	if err := renderHosts(&b, mirrors, dial, ex); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// renderServer writes the file's root: the upstream server and the
// settings kept from the user's file.
func renderServer(b *bytes.Buffer, r Registry, ex *existing) error {
	server := r.Server
	var root map[string]any
	if ex != nil {
		root = maps.Clone(ex.root)
		if s, _ := root["server"].(string); s != "" {
			// The user's upstream wins: they may route through a proxy.
			server = s
		} else if server == implicitServer(r) {
			// Leave it implicit, exactly as before (an explicit server
			// would interact with a root override_path).
			server = ""
		}
		delete(root, "server")
	}
	if server != "" {
		fmt.Fprintf(b, "server = %s\n", tomlstr.Basic(server))
	}
	if len(root) > 0 {
		enc, err := toml.Marshal(root)
		if err != nil {
			return fmt.Errorf("re-encoding server settings: %w", err)
		}
		b.Write(enc)
	}
	return nil
}

// renderHosts writes our mirrors first, then the user's hosts.
func renderHosts(b *bytes.Buffer, mirrors []string, dial time.Duration, ex *existing) error {
	ours := map[string]bool{}
	for _, m := range mirrors {
		ours[m] = true
		fmt.Fprintf(b, "\n[host.%s]\n  capabilities = [\"pull\", \"resolve\"]\n", tomlstr.Basic(m))
		if dial > 0 {
			fmt.Fprintf(b, "  dial_timeout = %s\n", tomlstr.Basic(dial.String()))
		}
	}
	if ex == nil {
		return nil
	}
	for _, h := range ex.hosts {
		if ours[h.key] {
			// Already listed first with our settings; TOML forbids
			// defining the same table twice.
			continue
		}
		enc, err := toml.Marshal(map[string]any{"host": map[string]any{h.key: h.cfg}})
		if err != nil {
			return fmt.Errorf("re-encoding host %q: %w", h.key, err)
		}
		// Marshal opens with a bare "[host]" header; repeating it per
		// entry would redefine the table, and the full
		// [host."..."] headers that follow already imply it.
		enc = bytes.TrimPrefix(enc, []byte("[host]\n"))
		b.WriteString("\n")
		b.Write(enc)
	}
	return nil
}
