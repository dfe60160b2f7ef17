// Package imagebuild builds fleetmirror's own images without a Docker
// daemon: static Go binaries and files laid into deterministic tar layers
// on an empty base, one image per platform, joined in an OCI index. The
// same inputs (sources, toolchain, version, creation time) give the same
// digests.
package imagebuild

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// NonRoot is the user our images run as. The containerd-prep DaemonSet
// edits the host's containerd config and restarts it, so it overrides this
// with runAsUser: 0 in its pod spec; every other container keeps it.
const NonRoot = 65532

// Spec describes one image.
type Spec struct {
	Name       string // key in the images map: "agent"
	Repository string // "ghcr.io/fleetmirror/agent"
	// Binaries maps a path in the image to the Go package built there.
	Binaries map[string]string
	// Files maps a path in the image to a file or folder on disk, copied
	// with its contents (folders recursively).
	Files       map[string]string
	Entrypoint  []string
	WorkingDir  string
	Title, Desc string
}

// Platform is an OS/architecture pair, "linux/amd64".
type Platform struct{ OS, Arch string }

func (p Platform) String() string { return p.OS + "/" + p.Arch }

// ParsePlatforms reads "linux/amd64,linux/arm64".
func ParsePlatforms(s string) ([]Platform, error) {
	var ps []Platform
	for _, f := range strings.Split(s, ",") {
		osName, arch, ok := strings.Cut(strings.TrimSpace(f), "/")
		if !ok || osName != "linux" || arch == "" || strings.Contains(arch, "/") {
			return nil, fmt.Errorf("platform %q: want linux/<arch>, e.g. linux/amd64,linux/arm64", f)
		}
		ps = append(ps, Platform{OS: osName, Arch: arch})
	}
	return ps, nil
}

// Options are the inputs every image shares.
type Options struct {
	Version   string     // image tag and the binaries' version
	Revision  string     // source revision, an OCI label when set
	Source    string     // repository URL, an OCI label
	Created   time.Time  // image creation time; zero: the Unix epoch
	Platforms []Platform // default linux/amd64
	// Module is the root of the Go module the binaries are built from.
	Module string
	// WorkDir holds the compiled binaries.
	WorkDir string
	// LDFlags are given to go build; VersionFlag is added per build.
	LDFlags string
}

// VersionVar is the variable -X sets to the version.
const VersionVar = "github.com/fleetmirror/fleetmirror/agent/version.Version"

// Compile builds pkg as a static binary for p into out. -trimpath, no VCS
// stamping and fixed flags make the output depend only on the sources,
// the toolchain and the version.
func Compile(ctx context.Context, module, pkg string, p Platform, version, ldflags, out string) error {
	flags := strings.TrimSpace(ldflags + " -X " + VersionVar + "=" + version)
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false", "-ldflags", flags, "-o", out, pkg)
	cmd.Dir = module
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+p.OS, "GOARCH="+p.Arch, "GOFLAGS=-buildvcs=false")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s for %s: %w\n%s", pkg, p, err, b)
	}
	return nil
}

// Build compiles the spec's binaries for every platform and returns the
// multi-platform index.
func Build(ctx context.Context, s Spec, o Options) (v1.ImageIndex, error) {
	if len(o.Platforms) == 0 {
		o.Platforms = []Platform{{"linux", "amd64"}}
	}
	if o.Version == "" {
		return nil, fmt.Errorf("image %s: a version is required", s.Name)
	}
	files, err := fileLayer(s.Files)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	base, err := baseLayer()
	if err != nil {
		return nil, err
	}
	var idx v1.ImageIndex = mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range o.Platforms {
		bins := map[string]string{}
		for dst, pkg := range s.Binaries {
			out := filepath.Join(o.WorkDir, p.OS+"_"+p.Arch, s.Name, path.Base(dst))
			if err := Compile(ctx, o.Module, pkg, p, o.Version, o.LDFlags, out); err != nil {
				return nil, err
			}
			bins[dst] = out
		}
		img, err := Assemble(s, o, p, base, files, bins)
		if err != nil {
			return nil, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: p.OS, Architecture: p.Arch},
		}})
	}
	return mutate.Annotations(idx, labels(s, o)).(v1.ImageIndex), nil
}

// Assemble makes one platform's image from built binaries (image path to
// file on disk): base layer, files layer (when any), binaries layer.
func Assemble(s Spec, o Options, p Platform, base, files v1.Layer, bins map[string]string) (v1.Image, error) {
	binLayer, err := fileLayer(bins)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	created := v1.Time{Time: o.Created.UTC()}
	cfg := &v1.ConfigFile{
		Architecture: p.Arch,
		OS:           p.OS,
		Created:      created,
		Config: v1.Config{
			Entrypoint: s.Entrypoint,
			User:       fmt.Sprintf("%d:%d", NonRoot, NonRoot),
			WorkingDir: s.WorkingDir,
			Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin", "TMPDIR=/tmp"},
			Labels:     labels(s, o),
		},
	}
	img, err := mutate.ConfigFile(mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON), cfg)
	if err != nil {
		return nil, err
	}
	adds := []mutate.Addendum{{Layer: base, History: v1.History{Created: created, CreatedBy: "fleetmirror base: /etc/passwd, /etc/group, /tmp"}}}
	if files != nil {
		adds = append(adds, mutate.Addendum{Layer: files, History: v1.History{Created: created, CreatedBy: "fleetmirror files"}})
	}
	adds = append(adds, mutate.Addendum{Layer: binLayer, History: v1.History{Created: created, CreatedBy: "fleetmirror binaries " + o.Version}})
	return mutate.Append(img, adds...)
}

func labels(s Spec, o Options) map[string]string {
	l := map[string]string{
		"org.opencontainers.image.title":       s.Title,
		"org.opencontainers.image.description": s.Desc,
		"org.opencontainers.image.version":     o.Version,
		"org.opencontainers.image.created":     o.Created.UTC().Format(time.RFC3339),
		"org.opencontainers.image.licenses":    "Apache-2.0",
	}
	if o.Source != "" {
		l["org.opencontainers.image.source"] = o.Source
	}
	if o.Revision != "" {
		l["org.opencontainers.image.revision"] = o.Revision
	}
	return l
}

// entry is one file or folder of a layer.
type entry struct {
	mode int64
	dir  bool
	data []byte
}

// baseLayer is the minimal runtime: the users, and a world-writable /tmp
// (the agent verifies peer blobs in $TMPDIR).
func baseLayer() (v1.Layer, error) {
	return layer(map[string]entry{
		"etc/passwd":   {mode: 0o644, data: fmt.Appendf(nil, "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonRoot, NonRoot)},
		"etc/group":    {mode: 0o644, data: fmt.Appendf(nil, "root:x:0:\nnonroot:x:%d:\n", NonRoot)},
		"tmp":          {mode: 0o1777, dir: true},
		"home/nonroot": {mode: 0o755, dir: true},
	})
}

// fileLayer reads files and folders from disk into a layer; nil when there
// are none. Modes keep only whether a file is executable.
func fileLayer(files map[string]string) (v1.Layer, error) {
	if len(files) == 0 {
		return nil, nil
	}
	entries := map[string]entry{}
	for dst, src := range files {
		dst = strings.TrimPrefix(path.Clean("/"+dst), "/")
		err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(src, p)
			if err != nil {
				return err
			}
			name := path.Join(dst, filepath.ToSlash(rel))
			if d.IsDir() {
				entries[name] = entry{mode: 0o755, dir: true}
				return nil
			}
			if !d.Type().IsRegular() {
				return fmt.Errorf("%s: only regular files and folders go into images", p)
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			mode := int64(0o644)
			if fi.Mode()&0o111 != 0 {
				mode = 0o755
			}
			entries[name] = entry{mode: mode, data: data}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("image file %s from %s: %w", dst, src, err)
		}
	}
	return layer(entries)
}

// layer writes entries (and their parent folders) sorted by path, owned by
// root, with the Unix epoch as every time, gzipped without a name or time
// in the header: the bytes depend on the contents only.
func layer(entries map[string]entry) (v1.Layer, error) {
	for name := range entries {
		for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = entry{mode: 0o755, dir: true}
			}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	for _, n := range names {
		e := entries[n]
		h := &tar.Header{Name: n, Mode: e.mode, ModTime: time.Unix(0, 0), Format: tar.FormatPAX, Typeflag: tar.TypeReg, Size: int64(len(e.data))}
		if e.dir {
			h.Name, h.Typeflag, h.Size = n+"/", tar.TypeDir, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(tarBuf.Bytes()); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	data := gz.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
}
