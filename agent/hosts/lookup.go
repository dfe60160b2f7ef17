package hosts

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Verify reports whether containerd, reading cfg.CertsDir, asks the first
// mirror target first for every registry cfg mirrors. It finds each
// registry's folder the way containerd does (hostDirectory and hostPaths in
// core/remotes/docker/config/hosts.go): "host_port_" first when
// hostPortDirs (containerd 1.7 and 2.x; 1.6 reads only "host:port"), then
// the host, then _default. Files written by anyone are judged alike, so it
// also checks what node user data wrote. The errors, joined, each name the
// file and what is wrong; nil when every registry goes through the mirror.
func Verify(cfg Config, hostPortDirs bool) error {
	p, err := cfg.plan()
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range p.registries {
		if err := verifyRegistry(cfg.CertsDir, p.mirrors[0], r, hostPortDirs); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func verifyRegistry(certsDir, mirror string, r Registry, hostPortDirs bool) error {
	name := r.Host
	if name == "" {
		name = "every registry"
	}
	want := filepath.Join(certsDir, r.Dir)
	dir := lookupDir(certsDir, r, hostPortDirs)
	switch {
	case dir == "":
		return fmt.Errorf("%s is missing: containerd pulls %s from upstream, never from the mirror", filepath.Join(want, FileName), name)
	case dir != want && filepath.Base(dir) != DefaultDir:
		return fmt.Errorf("%s shadows %s: containerd 1.7 and 2.x read the host_port_ folder first, so %s never goes through the mirror; remove that folder or put %s first in its hosts.toml",
			dir, want, name, mirror)
	}
	file := filepath.Join(dir, FileName)
	b, ok, err := readOptional(file)
	if err != nil {
		return err
	}
	if !ok {
		if dir != want {
			file = filepath.Join(want, FileName)
		}
		return fmt.Errorf("%s is missing: containerd pulls %s from upstream, never from the mirror", file, name)
	}
	order, err := hostOrder(b)
	if err != nil {
		return fmt.Errorf("%s: %w: containerd ignores the whole file and pulls %s from upstream", file, err, name)
	}
	if len(order) == 0 || strings.TrimSuffix(order[0], "/") != mirror {
		first := "no host"
		if len(order) > 0 {
			first = fmt.Sprintf("%q", order[0])
		}
		return fmt.Errorf("%s names %s first, not the mirror target %q: containerd asks the mirror for %s last or never", file, first, mirror, name)
	}
	return nil
}

// lookupDir is the folder containerd reads for r, "" when none exists.
func lookupDir(certsDir string, r Registry, hostPortDirs bool) string {
	var dirs []string
	if r.Host != "" {
		if i := strings.LastIndex(r.Host, ":"); hostPortDirs && i > 0 {
			dirs = append(dirs, filepath.Join(certsDir, r.Host[:i]+"_"+r.Host[i+1:]+"_"))
		}
		dirs = append(dirs, filepath.Join(certsDir, r.Dir))
	}
	dirs = append(dirs, filepath.Join(certsDir, DefaultDir))
	for _, d := range dirs {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d
		}
	}
	return ""
}
