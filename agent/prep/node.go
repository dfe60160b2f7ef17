package prep

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/pelletier/go-toml/v2"

	"github.com/fleetmirror/fleetmirror/agent/hosts"
	"github.com/fleetmirror/fleetmirror/agent/internal/atomicfile"
)

// Config says which containerd to prepare and how.
type Config struct {
	Options
	// Path is the containerd config.toml as this process sees it.
	Path string
	// HostRoot is where the host's / is mounted ("/" on the host): the
	// config's absolute imports and /etc/os-release are read under it.
	HostRoot string
	// Unit is containerd's systemd unit, restarted when the file changed.
	Unit string
	// Socket is containerd's gRPC socket, polled after the restart until
	// containerd answers; empty skips the wait.
	Socket string
	// RestartTimeout bounds the restart and the wait for the socket.
	RestartTimeout time.Duration
}

// BackupSuffix names the copy of the original kept next to the config.
const BackupSuffix = ".fleetmirror.bak"

// Restarter restarts a systemd unit.
type Restarter interface {
	// CheckUnit fails when unit cannot be restarted: no systemd, no unit.
	CheckUnit(ctx context.Context, unit string) error
	// RestartUnit restarts unit and returns once systemd's job is done.
	RestartUnit(ctx context.Context, unit string) error
}

// Check reads the config and returns what is set and what would change;
// the error says why the node cannot be prepared. It writes nothing.
func Check(cfg Config) (*Plan, error) {
	if _, err := os.Lstat(cfg.Path); errors.Is(err, os.ErrNotExist) {
		return nil, refuse("%s does not exist; mount the host's containerd config folder there or set --config to its path", cfg.Path)
	}
	path, err := resolveLinks(cfg)
	if err != nil {
		return nil, err
	}
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading containerd config: %w", err)
	}
	if err := detectPlatform(cfg, src); err != nil {
		return nil, err
	}
	plan, err := Patch(src, cfg.Options)
	if plan != nil {
		plan.Path = path
	}
	if err != nil {
		return plan, fmt.Errorf("%s: %w", path, err)
	}
	// Imports are read from the folder of Config.Path, not of the link's
	// target: containerd resolves them against the path it was given.
	if err := checkImports(cfg, src); err != nil {
		return plan, err
	}
	if err := checkHostsFiles(cfg, plan); err != nil {
		return plan, err
	}
	return plan, nil
}

// hostRoot is where the host's / is seen from here.
func (cfg Config) hostRoot() string {
	if cfg.HostRoot == "" {
		return "/"
	}
	return cfg.HostRoot
}

// checkHostsFiles refuses to migrate a mirror over a hosts.toml that is
// already there with other content: containerd would read that file once
// config_path is set, and merging two configurations is a person's call.
// An identical file (a run that stopped before writing the config) is kept.
// The agent's own file (it may have started first) is not a user's: the
// migrated file becomes the one the agent keeps after its own hosts.
func checkHostsFiles(cfg Config, plan *Plan) error {
	for i, h := range plan.Hosts {
		dirs := []string{h.Dir}
		if host, port, err := net.SplitHostPort(h.Dir); err == nil {
			// containerd 1.7 and 2.x look in host_port_ before host:port.
			dirs = append(dirs, host+"_"+port+"_")
		}
		for _, d := range dirs {
			file := filepath.Join(cfg.CertsDir, d, "hosts.toml")
			b, ok, err := readHostFile(cfg, file)
			if err != nil {
				return refuse("cannot read %s to migrate %s (%v); nothing was changed", file, displayTable(h.Table), err)
			}
			if !ok {
				continue
			}
			if d == h.Dir && bytes.Equal(b, h.Content) {
				plan.Hosts[i].Exists = true
				continue
			}
			if d == h.Dir && hosts.IsAgentFile(b) {
				bak, ok, err := readHostFile(cfg, file+hosts.BackupSuffix)
				if err != nil {
					return refuse("cannot read %s to migrate %s (%v); nothing was changed", file+hosts.BackupSuffix, displayTable(h.Table), err)
				}
				plan.Hosts[i].AsBackup = true
				if !ok {
					continue
				}
				if bytes.Equal(bak, h.Content) {
					plan.Hosts[i].Exists = true
					continue
				}
				file += hosts.BackupSuffix
			}
			return refuse("%s would move into %s, but %s already exists with other content; merge the mirror's endpoints into that file by hand (as [host] entries, in order), remove %s and run prep again",
				displayTable(h.Table), h.Path(cfg.CertsDir), file, displayTable(h.Table))
		}
	}
	return nil
}

// readHostFile reads a file under the certs dir as the host sees it;
// false when there is none.
func readHostFile(cfg Config, file string) ([]byte, bool, error) {
	b, err := os.ReadFile(filepath.Join(cfg.hostRoot(), file))
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	return b, err == nil, err
}

// writeHostsFiles writes the migrated mirrors, each atomically, before the
// config that stops naming them: at no point does containerd see a config
// whose mirror has no hosts.toml.
func writeHostsFiles(cfg Config, plan *Plan, log *slog.Logger) error {
	for _, h := range plan.Hosts {
		file := h.Path(cfg.CertsDir)
		if h.AsBackup {
			file += hosts.BackupSuffix
		}
		if h.Exists {
			log.Info("inline mirror already migrated", "registry", h.Registry, "hostsToml", file)
			continue
		}
		p := filepath.Join(cfg.hostRoot(), file)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := writeHostsFile(p, h.Content, fileMode(0o644)); err != nil {
			return fmt.Errorf("writing %s: %w", p, err)
		}
		if h.AsBackup {
			log.Warn("migrated inline mirror to the agent's kept file: the agent's hosts.toml was there first; the agent puts these hosts after its own when it next writes (restart the agent pod; with --prepend-existing only)",
				"registry", h.Registry, "table", displayTable(h.Table), "file", file)
			continue
		}
		log.Info("migrated inline mirror to hosts.toml", "registry", h.Registry, "table", displayTable(h.Table), "hostsToml", file)
	}
	return nil
}

// writeHostsFile is writeAtomic; tests make it fail part way.
var writeHostsFile = writeAtomic

// fileMode is an os.FileInfo for writeAtomic of a new file: mode only,
// owner left as created (root).
type fileMode os.FileMode

func (m fileMode) Name() string       { return "" }
func (m fileMode) Size() int64        { return 0 }
func (m fileMode) Mode() os.FileMode  { return os.FileMode(m) }
func (m fileMode) ModTime() time.Time { return time.Time{} }
func (m fileMode) IsDir() bool        { return false }
func (m fileMode) Sys() any           { return nil }

// resolveLinks follows Config.Path while it is a symbolic link (node
// images that keep the real file elsewhere) and returns the file to read
// and patch: replacing the link by a regular file would leave the file
// containerd is configured with unpatched. Absolute targets are read under
// HostRoot, as the host sees them.
func resolveLinks(cfg Config) (string, error) {
	root := cfg.HostRoot
	if root == "" {
		root = "/"
	}
	path := cfg.Path
	for range 40 {
		fi, err := os.Lstat(path)
		if err != nil {
			return "", refuse("%s leads to %s, which this process cannot read (%v); mount the folder holding it (the chart mounts only the config's folder) or set --config to it",
				cfg.Path, path, err)
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			return path, nil
		}
		target, err := os.Readlink(path)
		if err != nil {
			return "", fmt.Errorf("reading the link %s: %w", path, err)
		}
		if filepath.IsAbs(target) {
			path = filepath.Join(root, target)
		} else {
			path = filepath.Join(filepath.Dir(path), target)
		}
	}
	return "", refuse("%s: too many levels of symbolic links", cfg.Path)
}

// Run prepares the node: when the config needs a change it checks that
// systemd can restart containerd, writes the file (keeping a backup, the
// mode and the owner), restarts containerd and waits until it answers.
// A config that is already right is left alone and nothing is restarted.
func Run(ctx context.Context, cfg Config, r Restarter, log *slog.Logger) (*Plan, error) {
	plan, err := Check(cfg)
	if err != nil {
		return plan, err
	}
	if !plan.Changed {
		log.Info("containerd already prepared, nothing to do", "config", cfg.Path)
		return plan, nil
	}
	if r == nil {
		return plan, refuse("no way to restart containerd: nothing was changed")
	}
	if err := r.CheckUnit(ctx, cfg.Unit); err != nil {
		return plan, fmt.Errorf("%w: cannot restart %s through systemd (%v); nothing was changed: mount the host's /run/systemd (or the system bus socket) and set --systemd-address, or prepare the node by hand",
			ErrRefused, cfg.Unit, err)
	}
	// The file itself, wherever Config.Path's links lead: it is
	// replaced in its own folder, so the links keep pointing at it.
	path := plan.Path
	if path != cfg.Path {
		log.Info("containerd config is a symbolic link; patching its target in place", "config", cfg.Path, "target", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return plan, err
	}
	orig, err := os.ReadFile(path)
	if err != nil {
		return plan, err
	}
	if err := writeAtomic(path+BackupSuffix, orig, fi); err != nil {
		return plan, fmt.Errorf("writing the backup: %w", err)
	}
	if err := writeHostsFiles(cfg, plan, log); err != nil {
		return plan, fmt.Errorf("migrating the inline mirrors: %w; %s was not changed", err, path)
	}
	if err := writeAtomic(path, plan.Patched, fi); err != nil {
		return plan, fmt.Errorf("writing %s: %w", path, err)
	}
	log.Info("patched containerd config", "config", path, "backup", path+BackupSuffix, "version", plan.Version, "fromEmpty", plan.FromEmpty)
	if err := restart(ctx, cfg, r); err != nil {
		// Put the original back so containerd runs on a config it
		// knows, and a second run tries again instead of finding the
		// file already patched.
		if werr := writeAtomic(path, orig, fi); werr != nil {
			return plan, fmt.Errorf("%w; restoring the original also failed: %v (the backup is %s)", err, werr, path+BackupSuffix)
		}
		rerr := restart(ctx, cfg, r)
		log.Error("restart failed, original config restored", "err", err, "restartAgain", fmt.Sprint(rerr))
		return plan, fmt.Errorf("%w; the original config was restored", err)
	}
	log.Info("restarted containerd", "unit", cfg.Unit)
	return plan, nil
}

func restart(ctx context.Context, cfg Config, r Restarter) error {
	ctx, cancel := context.WithTimeout(ctx, cfg.RestartTimeout)
	defer cancel()
	if err := r.RestartUnit(ctx, cfg.Unit); err != nil {
		return fmt.Errorf("restarting %s: %w", cfg.Unit, err)
	}
	if cfg.Socket == "" {
		return nil
	}
	return waitContainerd(ctx, cfg.Socket)
}

// waitContainerd polls the socket until containerd answers a version call.
func waitContainerd(ctx context.Context, socket string) error {
	var last error
	for {
		if last = ping(ctx, socket); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("containerd did not answer on %s after the restart: %v", socket, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func ping(ctx context.Context, socket string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := client.New(socket, client.WithTimeout(2*time.Second))
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Version(ctx)
	return err
}

// writeAtomic replaces path with data through a rename, with like's mode
// and owner, so containerd never reads half a file.
func writeAtomic(path string, data []byte, like os.FileInfo) error {
	err := atomicfile.Write(path, data, like.Mode().Perm(), atomicfile.OwnerOf(like))
	if le := (*os.LinkError)(nil); errors.As(err, &le) {
		return fmt.Errorf("%w (mount the folder holding the config, not the file itself)", err)
	}
	return err
}

// detectPlatform refuses nodes whose containerd config is generated by
// the platform: an edit would be overwritten or is not possible.
func detectPlatform(cfg Config, src []byte) error {
	dir := filepath.Dir(cfg.Path)
	head := strings.ToLower(string(src[:min(len(src), 512)]))
	for _, tmpl := range []string{"config.toml.tmpl", "config-v3.toml.tmpl"} {
		if _, err := os.Stat(filepath.Join(dir, tmpl)); err == nil {
			return refuse("%s sits next to %s: k3s or RKE2 generates it at every start; configure mirrors in registries.yaml "+
				"(or the embedded registry mirror) or put config_path and discard_unpacked_layers into the template", cfg.Path, tmpl)
		}
	}
	if strings.Contains(filepath.ToSlash(cfg.Path), "/var/lib/rancher/") || strings.Contains(head, "generated by k3s") || strings.Contains(head, "generated by rke2") {
		return refuse("%s is generated by k3s or RKE2 at every start; configure mirrors in registries.yaml (or the embedded registry mirror) or write a config.toml.tmpl", cfg.Path)
	}
	root := cfg.HostRoot
	if root == "" {
		root = "/"
	}
	switch id := osID(root); id {
	case "talos":
		return refuse("this node runs Talos, whose containerd config comes from the machine config: set registry mirrors and CRI settings there (machine.registries, machine.files into /etc/cri/conf.d)")
	case "bottlerocket":
		return refuse("this node runs Bottlerocket, whose containerd config is generated from its settings: use settings.container-registry.mirrors in the user data or apiclient")
	}
	return nil
}

// osID reads ID= from the host's os-release; "" when there is none.
func osID(root string) string {
	for _, p := range []string{"etc/os-release", "usr/lib/os-release"} {
		b, err := os.ReadFile(filepath.Join(root, p))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "ID="); ok {
				return strings.ToLower(strings.Trim(v, `"'`))
			}
		}
		return ""
	}
	return ""
}

// managedKeys are every key prep manages, in all config versions; an
// imported file setting one would override the main file.
var managedKeys = [][]string{
	{"plugins", criV1, "registry", "config_path"},
	{"plugins", criV1, "registry", "mirrors"},
	{"plugins", criV1, "containerd", "discard_unpacked_layers"},
	{"plugins", criImages, "registry", "config_path"},
	{"plugins", criImages, "registry", "mirrors"},
	{"plugins", criImages, "discard_unpacked_layers"},
	{"plugins", transfer, "config_path"},
}

// checkImports refuses when a file the config imports sets a managed key:
// containerd merges imports over the main file, so an edit there would not
// take effect. Imports are followed as containerd does, relative paths
// from the importing file's folder, globs expanded.
func checkImports(cfg Config, src []byte) error {
	root := cfg.HostRoot
	if root == "" {
		root = "/"
	}
	seen := map[string]bool{cfg.Path: true}
	pending := []struct {
		path string
		src  []byte
	}{{cfg.Path, src}}
	for len(pending) > 0 && len(seen) < 256 {
		cur := pending[0]
		pending = pending[1:]
		var m struct {
			Imports []string `toml:"imports"`
		}
		if err := toml.Unmarshal(cur.src, &m); err != nil {
			return refuse("%s: reading its imports: %v", cur.path, err)
		}
		for _, imp := range m.Imports {
			pattern := imp
			if filepath.IsAbs(imp) {
				pattern = filepath.Join(root, imp)
			} else {
				pattern = filepath.Join(filepath.Dir(cur.path), imp)
			}
			files, err := filepath.Glob(pattern)
			if err != nil {
				return refuse("%s imports %q, which is not a valid pattern: %v", cur.path, imp, err)
			}
			for _, f := range files {
				if seen[f] {
					continue
				}
				seen[f] = true
				b, err := os.ReadFile(f)
				if err != nil {
					return refuse("%s imports %s, which cannot be read (%v); mount it or fix the import", cur.path, f, err)
				}
				var im map[string]any
				if err := toml.Unmarshal(b, &im); err != nil {
					return refuse("%s imports %s, which does not parse as TOML (%s); fix it (containerd would not start with it either)", cur.path, f, parseError(err))
				}
				for _, k := range managedKeys {
					if lookup(im, k) != nil {
						return refuse("%s imports %s, which sets %s; containerd merges imports over the main file, so set config_path = %q and discard_unpacked_layers = false there, or remove it from that file",
							cur.path, f, strings.Join(k, "."), cfg.CertsDir)
					}
				}
				pending = append(pending, struct {
					path string
					src  []byte
				}{f, b})
			}
		}
	}
	return nil
}
