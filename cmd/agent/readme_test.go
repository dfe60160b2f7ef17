package main

import (
	"flag"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// readmeRoot is the repository root, where README.md is.
const readmeRoot = "../.."

// TestREADME fails when the README drifts from the tree: its Layout table
// must name every Go package directory under agent/, operator/, release/
// and cmd/ and nothing under them that is not one, and its flag table must
// name exactly the flags `agent mirror` defines.
func TestREADME(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(readmeRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)

	t.Run("layout lists every package", func(t *testing.T) {
		roots := []string{"agent", "operator", "release", "cmd"}
		var listed []string
		for _, cell := range firstCells(t, section(t, readme, "## Layout")) {
			for _, p := range codeSpans(cell) {
				p = strings.TrimSuffix(p, "/")
				if slices.Contains(roots, p) || slices.ContainsFunc(roots, func(r string) bool { return strings.HasPrefix(p, r+"/") }) {
					listed = append(listed, p)
				}
			}
		}
		var pkgs []string
		for _, r := range roots {
			pkgs = append(pkgs, goPackageDirs(t, r)...)
		}
		diff(t, "Layout table", "Go package directories", listed, pkgs)
	})

	t.Run("flag table lists every agent mirror flag", func(t *testing.T) {
		fset := flag.NewFlagSet("mirror", flag.ContinueOnError)
		fset.SetOutput(io.Discard)
		_ = commands["mirror"].Flags(fset)
		var defined []string
		fset.VisitAll(func(f *flag.Flag) { defined = append(defined, "--"+f.Name) })
		var listed []string
		for _, cell := range firstCells(t, section(t, readme, "## The agent")) {
			for _, s := range codeSpans(cell) {
				if strings.HasPrefix(s, "--") {
					listed = append(listed, s)
				}
			}
		}
		diff(t, "flag table", "`agent mirror` flags", listed, defined)
	})
}

// section is the text under heading up to the next heading of its level.
func section(t *testing.T, doc, heading string) string {
	t.Helper()
	i := strings.Index(doc, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("README has no %q", heading)
	}
	s := doc[i+len(heading)+2:]
	if j := strings.Index(s, "\n## "); j >= 0 {
		s = s[:j]
	}
	return s
}

// firstCells are the first cells of the body rows of the section's first
// table.
func firstCells(t *testing.T, s string) []string {
	t.Helper()
	var cells []string
	in := false
	for _, line := range strings.Split(s, "\n") {
		if !strings.HasPrefix(line, "|") {
			if in {
				break
			}
			continue
		}
		in = true
		cell := strings.TrimSpace(strings.Split(line, "|")[1])
		if strings.Trim(cell, "-: ") == "" {
			cells = cells[:0] // the header row ends at the delimiter row
			continue
		}
		cells = append(cells, cell)
	}
	if len(cells) == 0 {
		t.Fatal("no table in the section")
	}
	return cells
}

var codeSpan = regexp.MustCompile("`([^`]+)`")

func codeSpans(s string) []string {
	var out []string
	for _, m := range codeSpan.FindAllStringSubmatch(s, -1) {
		out = append(out, m[1])
	}
	return out
}

// goPackageDirs are the directories under root holding Go files, as
// slash paths from the repository root.
func goPackageDirs(t *testing.T, root string) []string {
	t.Helper()
	seen := map[string]bool{}
	err := filepath.WalkDir(filepath.Join(readmeRoot, root), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".go") {
			rel, err := filepath.Rel(readmeRoot, filepath.Dir(path))
			if err != nil {
				return err
			}
			seen[filepath.ToSlash(rel)] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for d := range seen {
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// diff reports what the README lists that the tree lacks, and the other
// way round.
func diff(t *testing.T, listedName, wantName string, listed, want []string) {
	t.Helper()
	for _, w := range want {
		if !slices.Contains(listed, w) {
			t.Errorf("README's %s leaves out %s", listedName, w)
		}
	}
	for _, l := range listed {
		if !slices.Contains(want, l) {
			t.Errorf("README's %s lists %s, which is not one of the %s", listedName, l, wantName)
		}
	}
}
