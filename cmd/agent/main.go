// Command agent runs on every node: it mirrors images between peers
// (mirror), and prepares and restores the node's containerd configuration.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/fleetmirror/fleetmirror/agent/version"
)

// command is one subcommand: its flags, with env twins, and what it runs.
type command struct {
	help  string
	flags func(fs *flag.FlagSet) func(ctx context.Context) error
}

var commands = map[string]command{
	"mirror":    {"serve the node's images to peers and mirror from peers for containerd", mirrorCommand},
	"hosts":     {"print the hosts.toml files a node's user data should write", hostsCommand},
	"cleanup":   {"restore the node's containerd mirror configuration as it was", cleanupCommand},
	"prep":      {"set containerd's config_path and discard_unpacked_layers, restart it if changed (--check: report only)", prepCommand},
	"keepalive": {"idle until stopped (the prep DaemonSet's keepalive container)", keepaliveCommand},
	"version": {"print the version", func(*flag.FlagSet) func(context.Context) error {
		return func(context.Context) error { fmt.Println(version.Version); return nil }
	}},
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	cmd, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "agent: unknown command %q\n\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	fs := flag.NewFlagSet("agent "+os.Args[1], flag.ContinueOnError)
	run := cmd.flags(fs)
	if err := parse(fs, os.Args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "agent %s: %v\n", os.Args[1], err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		slog.Error("agent "+os.Args[1]+" failed", "err", err)
		os.Exit(1)
	}
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(os.Stderr, "usage: agent <command> [flags]   (every flag also reads FLEETMIRROR_<FLAG_NAME>)")
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-8s %s\n", n, commands[n].help)
	}
}

// envName is a flag's environment twin: --mirror-resolve-timeout reads
// FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT.
func envName(flagName string) string {
	return "FLEETMIRROR_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parse parses args; a flag not given on the command line takes its env
// twin's value, and a bad value names the variable it came from.
func parse(fs *flag.FlagSet, args []string) error {
	fs.VisitAll(func(f *flag.Flag) { f.Usage += " [$" + envName(f.Name) + "]" })
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q; flags are --name=value", fs.Arg(0))
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("invalid value %q for %s (flag --%s): %v", v, envName(f.Name), f.Name, e)
			}
		}
	})
	return err
}

// listFlag is a comma-separated list that may also be repeated.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

// newLogger returns a JSON logger at the named level and makes it the default.
func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
	slog.SetDefault(log)
	return log, nil
}
