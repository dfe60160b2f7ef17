package main

import (
	"flag"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/cmd/internal/cli"
)

func TestEnvTwins(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		timeout time.Duration
		regs    string
		err     string
	}{
		{name: "defaults", timeout: 20 * time.Millisecond},
		{name: "env sets", env: map[string]string{"FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT": "50ms", "FLEETMIRROR_MIRRORED_REGISTRIES": "https://a.io, https://b.io"},
			timeout: 50 * time.Millisecond, regs: "https://a.io,https://b.io"},
		{name: "flag wins over env", args: []string{"--mirror-resolve-timeout=30ms"},
			env: map[string]string{"FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT": "50ms"}, timeout: 30 * time.Millisecond},
		{name: "bad env names the variable", env: map[string]string{"FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT": "soon"},
			err: "FLEETMIRROR_MIRROR_RESOLVE_TIMEOUT (flag --mirror-resolve-timeout)"},
		{name: "stray argument", args: []string{"extra"}, err: `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			_ = mirrorCommand(fs)
			err := cli.Parse(fs, tt.args)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := fs.Lookup("mirror-resolve-timeout").Value.(flag.Getter).Get().(time.Duration); got != tt.timeout {
				t.Errorf("timeout %s, want %s", got, tt.timeout)
			}
			if got := fs.Lookup("mirrored-registries").Value.String(); got != tt.regs {
				t.Errorf("registries %q, want %q", got, tt.regs)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	base := func() *mirrorConfig {
		return &mirrorConfig{registryAddr: ":30020", routerAddr: "10.0.0.1:30021", metricsAddr: ":30022",
			certsDir: "/etc/containerd/certs.d", resolveTimeout: 20 * time.Millisecond, resolveRetries: 3}
	}
	tests := []struct {
		name string
		mod  func(*mirrorConfig)
		err  string
	}{
		{name: "ok", mod: func(*mirrorConfig) {}},
		{name: "port", mod: func(c *mirrorConfig) { c.registryAddr = "30020" }, err: "--registry-addr"},
		{name: "timeout", mod: func(c *mirrorConfig) { c.resolveTimeout = 0 }, err: "--mirror-resolve-timeout"},
		{name: "retries", mod: func(c *mirrorConfig) { c.resolveRetries = 0 }, err: "--mirror-resolve-retries"},
		{name: "both bootstraps", mod: func(c *mirrorConfig) { c.bootstrapDNS = "x"; c.bootstrapPeers = cli.List{"a:1"} }, err: "choose one"},
		{name: "canary interval", mod: func(c *mirrorConfig) { c.canaryInterval = time.Millisecond }, err: "--canary-interval"},
		{name: "canary's name mirrored", mod: func(c *mirrorConfig) {
			c.canaryInterval = time.Minute
			c.mirroredRegistries = cli.List{"https://canary.fleetmirror.invalid"}
		}, err: "only the agent serves"},
		{name: "registry without scheme", mod: func(c *mirrorConfig) { c.mirroredRegistries = cli.List{"ghcr.io"} }, err: `use "https://ghcr.io"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			tt.mod(c)
			port, _, err := c.validate()
			if tt.err == "" {
				if err != nil || port != 30020 || c.mirrorTargets.String() != "http://127.0.0.1:30020" {
					t.Fatalf("port %d targets %q err %v", port, c.mirrorTargets.String(), err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Fatalf("error %v, want %q", err, tt.err)
			}
		})
	}
}
