package mirrorset

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
)

// Lint checks the set in setDir and every text file under root for legacy
// registry paths. It returns every finding, sorted by file and line.
func Lint(root, setDir string) ([]Finding, error) {
	s, findings, err := Load(setDir)
	if err != nil {
		return nil, err
	}
	findings = append(findings, s.Collisions()...)
	tree, err := LintTree(root)
	if err != nil {
		return nil, err
	}
	findings = append(findings, tree...)
	sort.SliceStable(findings, func(i, j int) bool {
		if findings[i].File != findings[j].File {
			return findings[i].File < findings[j].File
		}
		return findings[i].Line < findings[j].Line
	})
	return findings, nil
}

// maxScan bounds the files LintTree reads: generated data, not sources.
const maxScan = 4 << 20

// LintTree finds legacy registry paths in Dockerfiles, charts, overrides,
// docs and code under root. It reads the files git knows (tracked and not
// ignored) when root is a git work tree, else every file. Tests (*_test.go
// and testdata/) are skipped: they plant legacy paths on purpose.
func LintTree(root string) ([]Finding, error) {
	files, err := treeFiles(root)
	if err != nil {
		return nil, err
	}
	var out []Finding
	for _, rel := range files {
		if skipFile(rel) {
			continue
		}
		path := filepath.Join(root, rel)
		fi, err := os.Stat(path)
		if err != nil || !fi.Mode().IsRegular() || fi.Size() > maxScan {
			continue // removed since listed, or not a source
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		if bytes.IndexByte(data, 0) >= 0 {
			continue // binary
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		sc.Buffer(make([]byte, 0, 64<<10), maxScan)
		for n := 1; sc.Scan(); n++ {
			for _, hit := range imageref.LegacyPattern.FindAllString(sc.Text(), -1) {
				out = append(out, Finding{File: path, Line: n, Msg: fmt.Sprintf("legacy registry path %s: that registry is shut down and pulls fail; use %s", hit, imageref.Replacement(hit))})
			}
		}
	}
	return out, nil
}

func skipFile(rel string) bool {
	rel = filepath.ToSlash(rel)
	if strings.HasSuffix(rel, "_test.go") {
		return true
	}
	for _, part := range strings.Split(rel, "/") {
		if part == "testdata" || part == ".git" {
			return true
		}
	}
	return false
}

func treeFiles(root string) ([]string, error) {
	if _, err := os.Stat(filepath.Join(root, ".git")); err == nil {
		cmd := exec.Command("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
		cmd.Dir = root
		out, err := cmd.Output()
		if err == nil {
			var files []string
			for _, f := range strings.Split(string(out), "\x00") {
				if f != "" {
					files = append(files, f)
				}
			}
			return files, nil
		}
	}
	var files []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == ".git" {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			rel, err := filepath.Rel(root, path)
			if err != nil {
				return err
			}
			files = append(files, rel)
		}
		return nil
	})
	return files, err
}
