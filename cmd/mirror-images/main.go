// Command mirror-images keeps fleetmirror's third-party images: it lints
// mirror-images/ and the repository, plans and pushes the copies into a
// registry, pins digests, and writes and checks the images map.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
	"github.com/fleetmirror/fleetmirror/release/mirrorset"
)

// common are the flags every subcommand has.
type common struct {
	root, dir string
	opts      mirrorset.Options
}

// withCommon adds the flags every subcommand has to a subcommand's own.
func withCommon(f func(fs *flag.FlagSet, c *common) func(context.Context) error) func(*flag.FlagSet) func(context.Context) error {
	return func(fs *flag.FlagSet) func(context.Context) error {
		c := &common{}
		fs.StringVar(&c.root, "root", ".", "the repository to lint")
		fs.StringVar(&c.dir, "dir", "mirror-images", "the folder of one-line Dockerfiles")
		fs.IntVar(&c.opts.Jobs, "jobs", 4, "images copied at once")
		fs.BoolVar(&c.opts.Insecure, "insecure", false, "allow plain HTTP to registries off loopback")
		return f(fs, c)
	}
}

var commands = map[string]cli.Command{
	"lint":      {Help: "check mirror-images/ (one pinned FROM per folder, no collisions) and the repository (no legacy registry paths)", Flags: withCommon(lintCommand)},
	"plan":      {Help: "show where each image would be copied and whether it is there already; writes nothing", Flags: withCommon(planCommand)},
	"push":      {Help: "copy every image into --to REGISTRY[/PREFIX]", Flags: withCommon(pushCommand)},
	"pin":       {Help: "resolve each image's tag at its source and rewrite its Dockerfile's digest", Flags: withCommon(pinCommand)},
	"write-map": {Help: "write the images map from the folders (and --set for our own images)", Flags: withCommon(writeMapCommand)},
	"check":     {Help: "fail when the images map and the folders disagree", Flags: withCommon(checkCommand)},
}

func main() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	cli.Main("mirror-images", commands, "", os.Args[1:])
}

// load reads the set and refuses to go on when a Dockerfile is wrong.
func (c *common) load() (*mirrorset.Set, error) {
	s, findings, err := mirrorset.Load(c.dir)
	if err != nil {
		return nil, err
	}
	if len(findings) > 0 {
		return nil, findingsError(findings)
	}
	return s, nil
}

func findingsError(fs []mirrorset.Finding) error {
	lines := make([]string, len(fs))
	for i, f := range fs {
		lines[i] = "  " + f.String()
	}
	return fmt.Errorf("%d problems:\n%s", len(fs), strings.Join(lines, "\n"))
}

func lintCommand(fs *flag.FlagSet, c *common) func(context.Context) error {
	return func(context.Context) error {
		findings, err := mirrorset.Lint(c.root, c.dir)
		if err != nil {
			return err
		}
		if len(findings) > 0 {
			return findingsError(findings)
		}
		return nil
	}
}

// toFlag registers --to and returns a getter that refuses it empty.
func toFlag(fs *flag.FlagSet) func() (string, error) {
	to := fs.String("to", "", "target registry host[:port][/prefix]; images land at imageMirror's paths under it")
	return func() (string, error) {
		if *to == "" {
			return "", errors.New("--to is required, e.g. --to registry.corp:5000/mirror")
		}
		return *to, nil
	}
}

func planCommand(fs *flag.FlagSet, c *common) func(context.Context) error {
	target := toFlag(fs)
	return func(ctx context.Context) error {
		to, err := target()
		if err != nil {
			return err
		}
		s, err := c.load()
		if err != nil {
			return err
		}
		steps, err := mirrorset.Plan(ctx, s, to, c.opts)
		if err != nil {
			return err
		}
		for _, st := range steps {
			state := "copy"
			switch {
			case st.Err != nil:
				state = "unknown (" + st.Err.Error() + ")"
			case st.Present:
				state = "present"
			}
			fmt.Printf("%-12s %s\n  -> %s\n  %s\n", st.Image.Name, st.Source, st.Target, state)
		}
		return nil
	}
}

func pushCommand(fs *flag.FlagSet, c *common) func(context.Context) error {
	target := toFlag(fs)
	return func(ctx context.Context) error {
		to, err := target()
		if err != nil {
			return err
		}
		s, err := c.load()
		if err != nil {
			return err
		}
		steps, err := mirrorset.Push(ctx, s, to, c.opts)
		for _, st := range steps {
			fmt.Printf("%-8s %-12s %s\n", st.Action, st.Image.Name, st.Target)
		}
		return err
	}
}

func pinCommand(fs *flag.FlagSet, c *common) func(context.Context) error {
	return func(ctx context.Context) error {
		s, findings, err := mirrorset.Load(c.dir)
		if err != nil {
			return err
		}
		for _, f := range findings {
			fmt.Fprintln(os.Stderr, "skipped:", f)
		}
		steps, err := mirrorset.Pin(ctx, s, c.opts)
		for _, st := range steps {
			if st.Err == nil {
				fmt.Printf("%-12s %s\n", st.Image.Name, st.Target)
			}
		}
		return err
	}
}

// sets collects repeated --set key=reference flags.
type sets map[string]string

func (s sets) String() string { return fmt.Sprint(map[string]string(s)) }
func (s sets) Set(v string) error {
	k, ref, ok := strings.Cut(v, "=")
	if !ok || k == "" || ref == "" {
		return fmt.Errorf("want key=reference, e.g. agent=ghcr.io/fleetmirror/agent:v1@sha256:...")
	}
	s[k] = ref
	return nil
}

func mapFlag(fs *flag.FlagSet, c *common) func() string {
	out := fs.String("map", "", "the images map (default <dir>/"+mirrorset.MapFile+")")
	return func() string {
		if *out != "" {
			return *out
		}
		return filepath.Join(c.dir, mirrorset.MapFile)
	}
}

func writeMapCommand(fs *flag.FlagSet, c *common) func(context.Context) error {
	own := sets{}
	fs.Var(own, "set", "key=reference for one of our own images (agent, operator); repeatable")
	path := mapFlag(fs, c)
	return func(context.Context) error {
		s, err := c.load()
		if err != nil {
			return err
		}
		// Our own images' entries stay as they were unless --set replaces them.
		kept := map[string]string{}
		if old, err := mirrorset.ReadMap(path()); err == nil {
			for _, k := range mirrorset.OwnImages {
				if v, ok := old[k]; ok {
					kept[k] = v
				}
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		for k, v := range own {
			kept[k] = v
		}
		m := s.Map(kept)
		if fs := s.Check(path(), m); len(fs) > 0 {
			return findingsError(fs)
		}
		return mirrorset.WriteMap(path(), m)
	}
}

func checkCommand(fs *flag.FlagSet, c *common) func(context.Context) error {
	path := mapFlag(fs, c)
	return func(context.Context) error {
		s, err := c.load()
		if err != nil {
			return err
		}
		m, err := mirrorset.ReadMap(path())
		if err != nil {
			return err
		}
		if fs := s.Check(path(), m); len(fs) > 0 {
			return findingsError(fs)
		}
		return nil
	}
}
