package system

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// moduleRoot finds the repository root (the folder with go.mod) from the
// working dir up.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("system: no go.mod above %s; set Options.Module to the repository root", dir)
		}
	}
}

// helmBinary is the helm hack/tools.sh built.
func helmBinary() (string, error) {
	tools := os.Getenv("FLEETMIRROR_TOOLS")
	if tools == "" {
		tools = "/var/cache/fleetmirror/tools"
	}
	p := filepath.Join(tools, "helm-"+HelmVersion, "bin", "helm")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("helm %s not found at %s: run `make tools` (hack/tools.sh)", HelmVersion, p)
	}
	return p, nil
}

// readCertsDir returns every file under a certs.d folder by relative path.
func readCertsDir(dir string) (map[string]string, error) {
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		files[rel] = string(b)
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return files, nil
	}
	return files, err
}

// listNames returns the names of a typed list's items (none if err).
func listNames(list runtime.Object, err error) []string {
	if err != nil {
		return nil
	}
	items, err := meta.ExtractList(list)
	if err != nil {
		return []string{"(" + err.Error() + ")"}
	}
	var names []string
	for _, it := range items {
		if a, err := meta.Accessor(it); err == nil {
			names = append(names, a.GetName())
		}
	}
	return names
}

func names[T any, P interface {
	*T
	GetName() string
}](items []T) string {
	var ns []string
	for i := range items {
		ns = append(ns, P(&items[i]).GetName())
	}
	return strings.Join(ns, ", ")
}

func without(names []string, drop string) []string {
	var out []string
	for _, n := range names {
		if n != drop {
			out = append(out, n)
		}
	}
	return out
}

func matching(names []string, subs ...string) []string {
	var out []string
	for _, n := range names {
		for _, s := range subs {
			if strings.Contains(n, s) {
				out = append(out, n)
				break
			}
		}
	}
	return out
}

func intOrString(i int) intstr.IntOrString { return intstr.FromInt32(int32(i)) }

func mb(b int64) string { return fmt.Sprintf("%.1f MB", float64(b)/1e6) }

func indent(s string) string { return "    " + strings.ReplaceAll(s, "\n", "\n    ") }

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n  ")
}

// logf goes to the harness log (Options.Logf), not the narration. It lives
// here, not in system.go, so test output filters that show system.go's
// narration leave these lines out.
func (s *scenario) logf(format string, args ...any) {
	if s.opts.Logf != nil {
		s.opts.Logf(format, args...)
	}
}
