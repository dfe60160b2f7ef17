// Package containerdconfig writes the config.toml of a containerd started
// by a test (test/cluster's nodes, agent/store's and agent/prep's test
// containerds): one place that knows what a containerd needs to run beside
// others on a test machine. It imports nothing of the project, so any
// package's tests can use it.
package containerdconfig

import (
	"fmt"
	"strconv"
	"strings"
)

// Config is a test containerd's config.toml: its own root, state and
// sockets so it shares nothing with the host or another test containerd;
// debug and metrics listeners off; the plugins that cannot work on a test
// machine (snapshotters needing special filesystems, NRI, tracing) disabled
// so startup is quick and quiet; and the plugin tables the caller adds.
type Config struct {
	// Version is the config version: 3 (containerd 2.x's) or 2 (1.x's,
	// which 2.x migrates on load).
	Version int
	// Major is containerd's major version, 1 or 2: it decides which of
	// the plugins that cannot work here exist to be disabled.
	Major int
	// Root, State and Socket (gRPC; ttrpc is Socket+".ttrpc") are the
	// containerd's own.
	Root, State, Socket string
	// Opt is the opt plugin's path; empty leaves the [plugins] table out
	// when Plugins is empty too.
	Opt string
	// NoImports writes `imports = []`, so the host's conf.d is not read.
	NoImports bool
	// DebugLevel is [debug] level; empty leaves it out.
	DebugLevel string
	// Disable lists plugins to disable beside Disabled(Major).
	Disable []string
	// Plugins is TOML inside [plugins], after the opt plugin's table,
	// indented by two spaces per level as containerd writes it.
	Plugins string
}

// Disabled returns the plugins of containerd major version major that
// cannot work on a test machine or are not wanted there.
func Disabled(major int) []string {
	out := []string{
		"io.containerd.snapshotter.v1.btrfs",
		"io.containerd.snapshotter.v1.devmapper",
		"io.containerd.snapshotter.v1.zfs",
		"io.containerd.snapshotter.v1.aufs",
	}
	if major >= 2 {
		// 1.6 has no erofs, blockfile or NRI plugins.
		out = append(out,
			"io.containerd.snapshotter.v1.erofs",
			"io.containerd.snapshotter.v1.blockfile",
			"io.containerd.differ.v1.erofs",
			"io.containerd.mount-handler.v1.erofs",
			"io.containerd.nri.v1.nri",
		)
	}
	return append(out,
		"io.containerd.tracing.processor.v1.otlp",
		"io.containerd.internal.v1.tracing",
	)
}

// String renders the config.
func (c Config) String() string {
	q := strconv.Quote
	var b strings.Builder
	fmt.Fprintf(&b, "version = %d\nroot = %s\nstate = %s\n", c.Version, q(c.Root), q(c.State))
	if c.NoImports {
		b.WriteString("imports = []\n")
	}
	b.WriteString("disabled_plugins = [\n")
	for _, p := range append(Disabled(c.Major), c.Disable...) {
		fmt.Fprintf(&b, "  %s,\n", q(p))
	}
	b.WriteString("]\n\n")
	fmt.Fprintf(&b, "[grpc]\n  address = %s\n\n[ttrpc]\n  address = %s\n\n", q(c.Socket), q(c.Socket+".ttrpc"))
	b.WriteString("[debug]\n  address = \"\"\n")
	if c.DebugLevel != "" {
		fmt.Fprintf(&b, "  level = %s\n", q(c.DebugLevel))
	}
	b.WriteString("\n[metrics]\n  address = \"\"\n")
	if c.Opt == "" && c.Plugins == "" {
		return b.String()
	}
	b.WriteString("\n[plugins]\n")
	if c.Opt != "" {
		fmt.Fprintf(&b, "  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = %s\n\n", q(c.Opt))
	}
	b.WriteString(c.Plugins)
	return b.String()
}
