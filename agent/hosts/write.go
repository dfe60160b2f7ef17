package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/internal/atomicfile"
)

// Write installs cfg's hosts.toml files under cfg.CertsDir and removes the
// ones we wrote earlier for registries no longer listed. A user's hosts.toml
// is backed up before it is first replaced. Files whose content would not
// change are left alone, so calling Write periodically is cheap. Errors for
// individual registries are joined; the others are still written.
func Write(cfg Config) error {
	if cfg.CertsDir == "" {
		return fmt.Errorf("certs dir is empty; set it to containerd's registry config_path, e.g. %s", DefaultCertsDir)
	}
	p, err := cfg.plan()
	if err != nil {
		return err
	}
	var errs []error
	if len(cfg.Registries) == 0 && cfg.Prepend {
		kept, err := keptRegistries(cfg.CertsDir, p)
		if err != nil {
			errs = append(errs, err)
		}
		p.registries = append(p.registries, kept...)
	}
	wanted := map[string]bool{}
	for _, r := range p.registries {
		wanted[r.Dir] = true
		if err := writeRegistry(cfg, p.mirrors, r); err != nil {
			errs = append(errs, err)
		}
	}
	if p.canary != nil {
		wanted[p.canary.Dir] = true
		errs = append(errs, writeCanary(cfg, p))
	}
	entries, err := os.ReadDir(cfg.CertsDir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, e := range entries {
		if e.IsDir() && !wanted[e.Name()] {
			if err := cleanupDir(filepath.Join(cfg.CertsDir, e.Name())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// keptRegistries are the registries of a mirror-all config that already
// have a folder of their own holding a hosts.toml that is not ours (or ours
// over a user's, backed up): containerd reads a registry's own folder
// instead of _default, so without our targets in it that registry would
// skip the mirror. prep's --migrate-mirrors makes such folders (GKE's
// inline Docker Hub mirror), and so may the node image. With Prepend they
// get ours first and keep their hosts after; without it they are left alone.
func keptRegistries(certsDir string, p plan) ([]Registry, error) {
	entries, err := os.ReadDir(certsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Registry
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || name == DefaultDir || (p.canary != nil && name == p.canary.Dir) {
			continue
		}
		file := filepath.Join(certsDir, name, FileName)
		cur, curOK, err := readOptional(file)
		if err != nil {
			return out, err
		}
		_, bakOK, err := readOptional(file + BackupSuffix)
		if err != nil {
			return out, err
		}
		if !(curOK && !isOurs(cur)) && !bakOK {
			// Nobody's configuration to keep: an empty folder, or a
			// file of ours from an earlier registry list (cleaned up).
			continue
		}
		r := Registry{Host: dirHost(name), Dir: name}
		r.Server = implicitServer(r)
		out = append(out, r)
	}
	return out, nil
}

// dirHost is the registry host a certs.d folder stands for: the name as
// written, or containerd 1.7+'s "host_port_" form for host:port.
func dirHost(dir string) string {
	if base, ok := strings.CutSuffix(dir, "_"); ok {
		if i := strings.LastIndex(base, "_"); i > 0 {
			return base[:i] + ":" + base[i+1:]
		}
	}
	return dir
}

// WriteCanary installs only the canary's hosts.toml (Config.Canary), for
// agents whose node writes the mirrored registries' files itself.
func WriteCanary(cfg Config) error {
	if cfg.CertsDir == "" || cfg.Canary == "" {
		return errors.New("canary hosts.toml: certs dir and canary name are required")
	}
	p, err := cfg.plan()
	if err != nil {
		return err
	}
	return writeCanary(cfg, p)
}

// writeCanary writes the canary's file: the first mirror target only, as
// host and server, and never a user's hosts (no name could have any).
func writeCanary(cfg Config, p plan) error {
	cfg.Prepend = false
	return writeRegistry(cfg, p.mirrors[:1], *p.canary)
}

// Cleanup undoes Write: every backup is restored, and files we wrote without
// a backup are removed together with directories we created (if empty).
// A hosts.toml that is not ours is never touched. Running it again, or on a
// directory Write never used, does nothing.
func Cleanup(certsDir string) error {
	entries, err := os.ReadDir(certsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			if err := cleanupDir(filepath.Join(certsDir, e.Name())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// readOptional reads a file, treating "does not exist" as absent.
func readOptional(name string) (b []byte, ok bool, err error) {
	b, err = os.ReadFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return b, true, nil
}

func writeRegistry(cfg Config, mirrors []string, r Registry) error {
	dir := filepath.Join(cfg.CertsDir, r.Dir)
	file := filepath.Join(dir, FileName)
	backup := file + BackupSuffix
	c, err := readFolder(dir, file, backup)
	if err != nil {
		return err
	}
	var ex *existing
	if cfg.Prepend && len(bytes.TrimSpace(c.base)) > 0 {
		if ex, err = parseExisting(c.base); err != nil {
			return fmt.Errorf("%s: cannot keep existing configuration (fix or remove the file, or disable prepend): %w", c.baseName, err)
		}
	}
	content, err := renderFile(mirrors, cfg.DialTimeout, r, ex, c.createdDir)
	if err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	sweepTemps(dir, staleTemp)
	if c.curOK && bytes.Equal(c.cur, content) {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if c.needBackup {
		mode := fs.FileMode(0o644)
		if st, err := os.Stat(file); err == nil {
			mode = st.Mode().Perm()
		}
		if err := atomicfile.Write(backup, c.cur, mode); err != nil {
			return fmt.Errorf("backing up %s: %w", file, err)
		}
	}
	return atomicfile.Write(file, content, 0o644)
}

// folder is what a registry folder holds before a write.
type folder struct {
	cur   []byte // the hosts.toml there, if curOK
	curOK bool
	// base is the user's configuration that Prepend keeps; baseName says
	// where it came from for error messages.
	base       []byte
	baseName   string
	needBackup bool // the user's file is not saved yet (or changed since)
	createdDir bool // the folder is ours to remove on cleanup
}

func readFolder(dir, file, backup string) (folder, error) {
	var c folder
	var err error
	if c.cur, c.curOK, err = readOptional(file); err != nil {
		return c, err
	}
	bak, bakOK, err := readOptional(backup)
	if err != nil {
		return c, err
	}
	switch {
	case c.curOK && !isOurs(c.cur):
		// A user's file, or one that replaced ours since: it is the
		// configuration to keep and to restore later.
		c.base, c.baseName = c.cur, file
		c.needBackup = !bakOK || !bytes.Equal(bak, c.cur)
	case c.curOK:
		c.createdDir = createdDirFlag(c.cur)
		if bakOK {
			c.base, c.baseName = bak, backup
		}
	case bakOK:
		// Our file was deleted but the user's original is still saved.
		c.base, c.baseName = bak, backup
	default:
		if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
			c.createdDir = true
		} else if err != nil {
			return c, err
		}
	}
	return c, nil
}

// cleanupDir restores or removes what we did in one registry directory.
func cleanupDir(dir string) error {
	sweepTemps(dir, 0)
	file := filepath.Join(dir, FileName)
	backup := file + BackupSuffix
	cur, curOK, err := readOptional(file)
	if err != nil {
		return err
	}
	ours := curOK && isOurs(cur)
	if _, err := os.Lstat(backup); err == nil {
		if curOK && !ours {
			// Someone replaced our file since; their newer config wins
			// and the old backup stays for them to judge.
			return nil
		}
		// rename is atomic and keeps the original bytes and mode.
		return os.Rename(backup, file)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if !ours {
		return nil
	}
	if err := os.Remove(file); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if createdDirFlag(cur) {
		// Fails harmlessly if someone put other files there.
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) && !isNotEmpty(dir) {
			return err
		}
	}
	return nil
}

func isNotEmpty(dir string) bool {
	entries, err := os.ReadDir(dir)
	return err == nil && len(entries) > 0
}

// staleTemp is how old a temp file of atomicfile.Write must be before Write
// removes it: an agent killed between create and rename leaves one behind,
// while a younger one may belong to a writer still at work (the old and
// the new agent pod overlap during an update).
const staleTemp = time.Minute

// sweepTemps removes atomicfile.Write's temp files for hosts.toml and its
// backup in dir that are at least olderThan old. Nothing else matches.
func sweepTemps(dir string, olderThan time.Duration) {
	for _, base := range []string{FileName, FileName + BackupSuffix} {
		matches, _ := filepath.Glob(filepath.Join(dir, "."+base+atomicfile.TempInfix+"*"))
		for _, m := range matches {
			if st, err := os.Lstat(m); err == nil && st.Mode().IsRegular() && time.Since(st.ModTime()) >= olderThan {
				_ = os.Remove(m)
			}
		}
	}
}
