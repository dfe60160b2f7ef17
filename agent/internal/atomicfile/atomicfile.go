// Package atomicfile replaces files through a temp file and a rename, so a
// reader (containerd reading hosts.toml or config.toml, the agent reading
// its identity key) sees the old file or the new one, never part of one,
// and a crash leaves no truncated file behind.
package atomicfile

import (
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// TempInfix sits between a file's name and the random part in the names of
// Write's temp files, which are ".<name>" + TempInfix + "<random>" in the
// file's directory; callers that sweep left-over temp files match on it.
const TempInfix = ".tmp-"

// Option changes how Write creates the file.
type Option func(*options)

type options struct {
	owner *syscall.Stat_t
}

// OwnerOf gives the new file the owner and group of fi (a file being
// replaced), when fi carries them.
func OwnerOf(fi fs.FileInfo) Option {
	return func(o *options) {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			o.owner = st
		}
	}
}

// Write replaces name with data and mode perm: it writes a temp file in the
// same directory, syncs it, renames it over name and syncs the directory.
// The temp file is removed on every failure. A failed rename is returned as
// the *os.LinkError of os.Rename (a bind-mounted file cannot be renamed over).
func Write(name string, data []byte, perm fs.FileMode, opts ...Option) (err error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	dir := filepath.Dir(name)
	f, err := os.CreateTemp(dir, "."+filepath.Base(name)+TempInfix+"*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Chmod(perm); err != nil {
		return err
	}
	if o.owner != nil {
		if err = f.Chown(int(o.owner.Uid), int(o.owner.Gid)); err != nil {
			return err
		}
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(f.Name(), name); err != nil {
		return err
	}
	// Best effort: the rename is done; a failed directory sync only means
	// the rename may not survive a power loss.
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}
