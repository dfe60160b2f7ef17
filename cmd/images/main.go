// Command images builds fleetmirror's own images (agent, operator) with
// go-containerregistry, without a Docker daemon: reproducible OCI indexes
// written to an OCI layout and, when asked, pushed to a registry.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
	"github.com/fleetmirror/fleetmirror/release/imagebuild"
)

func main() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	fs := flag.NewFlagSet("images", flag.ContinueOnError)
	names := fs.String("images", "agent,operator", "images to build, separated by commas or spaces")
	version := fs.String("version", "dev", "image tag and binaries' version")
	revision := fs.String("revision", "", "source revision for the OCI label")
	platforms := fs.String("platforms", "linux/amd64", "platforms of the index, e.g. linux/amd64,linux/arm64")
	out := fs.String("out", "bin/images", "folder for the OCI layouts (<out>/<image>) and the compiled binaries")
	push := fs.String("push", "", "push to REGISTRY[/PREFIX] at the imageMirror path of each image")
	publish := fs.Bool("publish", false, "push to the images' own references (ghcr.io/fleetmirror/...)")
	refs := fs.String("refs", "", "write name=reference@digest lines here, for `mirror-images write-map --set`")
	module := fs.String("module", ".", "root of the fleetmirror module")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: images [flags]   (every flag also reads FLEETMIRROR_<FLAG_NAME>; SOURCE_DATE_EPOCH sets the creation time)")
		fs.PrintDefaults()
	}
	if err := cli.Parse(fs, os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "images: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *names, *version, *revision, *platforms, *out, *push, *publish, *refs, *module); err != nil {
		fmt.Fprintf(os.Stderr, "images: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, names, version, revision, platforms, out, push string, publish bool, refsFile, module string) error {
	ps, err := imagebuild.ParsePlatforms(platforms)
	if err != nil {
		return fmt.Errorf("--platforms: %w", err)
	}
	created, err := sourceDate()
	if err != nil {
		return err
	}
	if module, err = filepath.Abs(module); err != nil {
		return err
	}
	if out, err = filepath.Abs(out); err != nil {
		return err
	}
	chosen, err := choose(names, module)
	if err != nil {
		return err
	}
	opts := imagebuild.Options{
		Version: version, Revision: revision, Source: imagebuild.DefaultSourceURL, Created: created,
		Platforms: ps, Module: module, WorkDir: filepath.Join(out, "bin"), LDFlags: "-s -w",
	}
	// --push names a registry; --publish pushes to the image's own.
	var targets []string
	if push != "" {
		targets = append(targets, push)
	}
	if publish {
		targets = append(targets, "")
	}
	var lines []string
	for _, s := range chosen {
		idx, ref, err := buildOne(ctx, s, opts, out, platforms)
		if err != nil {
			return err
		}
		lines = append(lines, s.Name+"="+ref)
		for _, to := range targets {
			where, err := imagebuild.Push(ctx, idx, s.Ref(version), to)
			if err != nil {
				return err
			}
			fmt.Printf("%s pushed %s\n", s.Name, where)
		}
	}
	if refsFile != "" {
		return os.WriteFile(refsFile, []byte(strings.Join(lines, "\n")+"\n"), 0o644)
	}
	return nil
}

// sourceDate is the images' creation time: SOURCE_DATE_EPOCH when set, for
// reproducible builds, else the Unix epoch.
func sourceDate() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0), nil
	}
	sec, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: want seconds since 1970", s)
	}
	return time.Unix(sec, 0), nil
}

// choose returns the specs --images names, each checked against the module.
func choose(names, module string) ([]imagebuild.Spec, error) {
	specs := imagebuild.Specs(module)
	var chosen []imagebuild.Spec
	for _, n := range strings.FieldsFunc(names, func(r rune) bool { return r == ',' || r == ' ' }) {
		s, ok := specs[n]
		if !ok {
			return nil, fmt.Errorf("--images: unknown image %q; known: agent, operator", n)
		}
		if err := s.Check(module); err != nil {
			return nil, err
		}
		chosen = append(chosen, s)
	}
	return chosen, nil
}

// buildOne builds s, writes its OCI layout under out and returns the index
// and its reference by digest.
func buildOne(ctx context.Context, s imagebuild.Spec, opts imagebuild.Options, out, platforms string) (v1.ImageIndex, string, error) {
	start := time.Now()
	idx, err := imagebuild.Build(ctx, s, opts)
	if err != nil {
		return nil, "", err
	}
	d, err := idx.Digest()
	if err != nil {
		return nil, "", err
	}
	if err := imagebuild.WriteLayout(filepath.Join(out, s.Name), idx); err != nil {
		return nil, "", err
	}
	ref := s.Ref(opts.Version) + "@" + d.String()
	slog.Info("built", "image", s.Name, "ref", ref, "platforms", platforms, "took", time.Since(start).Round(time.Millisecond))
	fmt.Printf("%s %s\n", s.Name, ref)
	return idx, ref, nil
}
