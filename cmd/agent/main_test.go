package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
	"github.com/fleetmirror/fleetmirror/agent/web"
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
		return &mirrorConfig{registryAddr: ":30120", routerAddr: "10.0.0.1:30121", metricsAddr: ":30122",
			certsDir: "/etc/containerd/certs.d", resolveTimeout: 20 * time.Millisecond, resolveRetries: 3,
			maxRequests: 512, debugWeb: true, debugWebAddr: "127.0.0.1:30123"}
	}
	tests := []struct {
		name string
		mod  func(*mirrorConfig)
		err  string
	}{
		{name: "ok", mod: func(*mirrorConfig) {}},
		{name: "port", mod: func(c *mirrorConfig) { c.registryAddr = "30120" }, err: "--registry-addr"},
		{name: "timeout", mod: func(c *mirrorConfig) { c.resolveTimeout = 0 }, err: "--mirror-resolve-timeout"},
		{name: "retries", mod: func(c *mirrorConfig) { c.resolveRetries = 0 }, err: "--mirror-resolve-retries"},
		{name: "max requests", mod: func(c *mirrorConfig) { c.maxRequests = 0 }, err: "--max-requests"},
		{name: "debug page address", mod: func(c *mirrorConfig) { c.debugWebAddr = "localhost" }, err: "--debug-web-addr"},
		{name: "debug page off", mod: func(c *mirrorConfig) { c.debugWeb, c.debugWebAddr = false, "" }},
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
				if err != nil || port != 30120 || c.mirrorTargets.String() != "http://127.0.0.1:30120" {
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

// memoryRouter is a routing.Memory with the peer list the page shows.
type memoryRouter struct{ *routing.Memory }

func (memoryRouter) Peers() []routing.Peer { return nil }

// TestDebugPageWiring: the page the agent serves on --debug-web-addr is
// the debug page at its root, and refuses a cross-site Measure Image Pull
// while one from the page itself reaches the handler.
func TestDebugPageWiring(t *testing.T) {
	c := &mirrorConfig{registryAddr: "127.0.0.1:1", resolveTimeout: 20 * time.Millisecond, resolveRetries: 3}
	h, err := c.debugPage(memoryRouter{routing.NewMemory(netip.MustParseAddrPort("127.0.0.1:1"))[0]}, storetest.NewMemory(),
		metrics.New(func() int { return 0 }), nil, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	post := func(headers ...string) (int, string) {
		t.Helper()
		// No image: the handler answers 400 at once, pulling nothing.
		req, _ := http.NewRequest(http.MethodPost, srv.URL+web.Path+"measure", strings.NewReader("image="))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		for i := 0; i+1 < len(headers); i += 2 {
			req.Header.Set(headers[i], headers[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if status, body := post("Sec-Fetch-Site", "cross-site", "Origin", "https://evil.example"); status != http.StatusForbidden {
		t.Errorf("cross-site POST: %d %s, want 403", status, body)
	}
	if status, body := post("Sec-Fetch-Site", "same-origin", "Origin", srv.URL); status != http.StatusBadRequest {
		t.Errorf("same-origin POST: %d %s, want the handler's 400", status, body)
	}
	resp, err := http.Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Request.URL.Path != web.Path {
		t.Errorf("GET /: %d at %s, want the page at %s", resp.StatusCode, resp.Request.URL.Path, web.Path)
	}
}

// TestHeaderBound: the registry's and metrics' servers refuse a request
// whose headers are larger than any containerd, peer or Prometheus sends.
func TestHeaderBound(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, slog.New(slog.DiscardHandler), ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), maxHeaderBytes)
	}()
	t.Cleanup(func() { cancel(); <-done })
	for _, tt := range []struct {
		size int
		want int
	}{{1 << 10, http.StatusOK}, {maxHeaderBytes + 8<<10, http.StatusRequestHeaderFieldsTooLarge}} {
		req, _ := http.NewRequest(http.MethodGet, "http://"+ln.Addr().String()+"/v2/", nil)
		req.Header.Set("X-Padding", strings.Repeat("a", tt.size))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("a %d byte header: %s, want %d", tt.size, resp.Status, tt.want)
		}
	}
}
