// Package cli is what the project's commands share: a table of
// subcommands, flags with environment twins, and the JSON logger.
package cli

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
)

// Command is one subcommand: Flags registers its flags and returns what
// runs once they are parsed.
type Command struct {
	Help  string
	Flags func(fs *flag.FlagSet) func(ctx context.Context) error
}

// Main runs the subcommand named by args[0] (or def when args is empty or
// starts with a flag and def is set) and exits: 2 for usage errors, 1 when
// the command fails.
func Main(program string, commands map[string]Command, def string, args []string) {
	name := def
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args = args[0], args[1:]
	}
	cmd, ok := commands[name]
	if !ok {
		if name != "" {
			fmt.Fprintf(os.Stderr, "%s: unknown command %q\n\n", program, name)
		}
		usage(program, commands)
		os.Exit(2)
	}
	fs := flag.NewFlagSet(program+" "+name, flag.ContinueOnError)
	run := cmd.Flags(fs)
	if err := Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "%s %s: %v\n", program, name, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx)
	stop()
	if err != nil {
		slog.Error(program+" "+name+" failed", "err", err)
		os.Exit(1)
	}
}

func usage(program string, commands map[string]Command) {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: %s <command> [flags]   (every flag also reads FLEETMIRROR_<FLAG_NAME>)\n", program)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-14s %s\n", n, commands[n].Help)
	}
}

// EnvName is a flag's environment twin: --mirror-resolve-timeout reads
// FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT.
func EnvName(flagName string) string {
	return "FLEETMIRROR_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Parse parses args; a flag not given on the command line takes its env
// twin's value, and a bad value names the variable it came from.
func Parse(fs *flag.FlagSet, args []string) error {
	fs.VisitAll(func(f *flag.Flag) { f.Usage += " [$" + EnvName(f.Name) + "]" })
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
		if v, ok := os.LookupEnv(EnvName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("invalid value %q for %s (flag --%s): %v", v, EnvName(f.Name), f.Name, e)
			}
		}
	})
	return err
}

// List is a comma-separated flag that may also be repeated.
type List []string

func (l *List) String() string { return strings.Join(*l, ",") }

// Set appends the comma-separated values of s.
func (l *List) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

// NewLogger returns a JSON logger at the named level and makes it the default.
func NewLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
	slog.SetDefault(log)
	return log, nil
}
