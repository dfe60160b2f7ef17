// Package mirrorset is the set of third-party images fleetmirror mirrors:
// one folder per image under mirror-images/, each with a one-line
// Dockerfile "FROM <reference@digest>". It lints the set and the
// repository, plans and pushes the copies into a registry with
// go-containerregistry, and keeps the images map in step with the folders.
package mirrorset

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
)

// Image is one folder of the set.
type Image struct {
	Name string // the folder name, also the key in the images map
	File string // path of its Dockerfile
	Ref  imageref.Reference
}

// Set is every image under a mirror-images folder, sorted by name.
type Set struct {
	Dir    string
	Images []Image
}

// Finding is one lint problem, located by file and line (1-based; 0 when
// it concerns the whole file).
type Finding struct {
	File string
	Line int
	Msg  string
}

func (f Finding) String() string {
	if f.Line == 0 {
		return f.File + ": " + f.Msg
	}
	return fmt.Sprintf("%s:%d: %s", f.File, f.Line, f.Msg)
}

var folderName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

// Load reads every <dir>/<name>/Dockerfile. Images whose Dockerfile is not
// exactly one valid FROM line are left out of the set and reported.
func Load(dir string) (*Set, []Finding, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("mirror set: %w", err)
	}
	s := &Set{Dir: dir}
	var findings []Finding
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		file := filepath.Join(dir, e.Name(), "Dockerfile")
		if !folderName.MatchString(e.Name()) {
			findings = append(findings, Finding{File: filepath.Join(dir, e.Name()), Msg: "folder name must be lower-case letters, digits and dashes: it is the key in the images map"})
			continue
		}
		data, err := os.ReadFile(file)
		if os.IsNotExist(err) {
			findings = append(findings, Finding{File: file, Msg: "missing: every folder holds one Dockerfile with a single FROM <reference@digest> line"})
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		img, fs := parseDockerfile(e.Name(), file, string(data))
		findings = append(findings, fs...)
		if len(fs) == 0 {
			s.Images = append(s.Images, img)
		}
	}
	sort.Slice(s.Images, func(i, j int) bool { return s.Images[i].Name < s.Images[j].Name })
	return s, findings, nil
}

// parseDockerfile accepts exactly "FROM <reference>" with a digest, one
// line, an optional final newline.
func parseDockerfile(name, file, data string) (Image, []Finding) {
	lines := strings.Split(strings.TrimSuffix(data, "\n"), "\n")
	if len(lines) != 1 {
		return Image{}, []Finding{{File: file, Line: 2, Msg: fmt.Sprintf("%d lines: the Dockerfile must be exactly one line, FROM <reference@digest>", len(lines))}}
	}
	fields := strings.Fields(lines[0])
	if len(fields) != 2 || fields[0] != "FROM" {
		return Image{}, []Finding{{File: file, Line: 1, Msg: fmt.Sprintf("%q: want exactly FROM <reference@digest> (no options, no stage name)", lines[0])}}
	}
	ref, err := imageref.Parse(fields[1])
	if err != nil {
		return Image{}, []Finding{{File: file, Line: 1, Msg: err.Error()}}
	}
	var fs []Finding
	if ref.Digest == "" {
		fs = append(fs, Finding{File: file, Line: 1, Msg: fmt.Sprintf("%s is not pinned: add @sha256:<digest> (a tag may stay beside it), e.g. `crane digest %s`", fields[1], ref)})
	}
	if imageref.IsLegacy(ref) {
		fs = append(fs, Finding{File: file, Line: 1, Msg: fmt.Sprintf("%s is on a legacy registry that is shut down: use %s", fields[1], imageref.Modernize(ref))})
	}
	return Image{Name: name, File: file, Ref: ref}, fs
}

// mirrorKey is where an image lands under any mirror: its path and tag, or
// its digest when it has no tag.
func mirrorKey(r imageref.Reference) string {
	r = imageref.Modernize(r)
	if r.Tag != "" {
		return imageref.Path(r) + ":" + r.Tag
	}
	return imageref.Path(r) + "@" + r.Digest
}

// Collisions reports images that would land on the same path and tag in
// the mirror (one would overwrite the other).
func (s *Set) Collisions() []Finding {
	seen := map[string]Image{}
	var fs []Finding
	for _, img := range s.Images {
		k := mirrorKey(img.Ref)
		if other, ok := seen[k]; ok {
			fs = append(fs, Finding{File: img.File, Line: 1, Msg: fmt.Sprintf("lands on %s in the mirror, like %s: keep one folder per image", k, other.File)})
			continue
		}
		seen[k] = img
	}
	return fs
}
