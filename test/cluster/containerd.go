package cluster

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/fleetmirror/fleetmirror/test/cluster/containerdconfig"
)

// Supported Options.Containerd values.
const (
	Containerd2  = "2"   // containerd v2.4.2 built into the tools dir
	Containerd16 = "1.6" // Debian's /usr/bin/containerd
)

const containerd2Version = "v2.4.2"

// DefaultToolsDir is where hack/tools.sh puts what it builds.
const DefaultToolsDir = "/var/cache/fleetmirror/tools"

// ToolsDir is $FLEETMIRROR_TOOLS or DefaultToolsDir.
func ToolsDir() string {
	if d := os.Getenv("FLEETMIRROR_TOOLS"); d != "" {
		return d
	}
	return DefaultToolsDir
}

// ContainerdBinary returns the containerd binary for version ("2" or "1.6").
func ContainerdBinary(version string) (string, error) {
	var p string
	switch version {
	case Containerd2, "":
		p = filepath.Join(ToolsDir(), "containerd-"+containerd2Version, "bin", "containerd")
	case Containerd16:
		p = "/usr/bin/containerd"
	default:
		return "", fmt.Errorf("containerd version %q: use %q or %q", version, Containerd2, Containerd16)
	}
	if fi, err := os.Stat(p); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return "", fmt.Errorf("containerd %s not found at %s: run `make tools` (hack/tools.sh)", version, p)
	}
	return p, nil
}

// containerdPaths are the per-node locations a config refers to.
type containerdPaths struct {
	Root, State, Socket, Opt, Certs, CNIConf, CNIBin string
	Pods                                             *PodRuntime
	// Unprepared leaves out what containerd-prep sets (Options.Unprepared).
	Unprepared bool
}

// Both configs are containerdconfig's (own root/state/sockets/opt so nodes
// share nothing; debug and metrics listeners off; snapshotters that cannot
// work here, NRI and tracing disabled) with these plugin tables: CRI keeps
// unpacked layers (discard_unpacked_layers = false) because the agent
// serves layers from the content store; registry hosts come from the
// node's certs.d. CNI points at empty per-node dirs: no
// pods run, and CRI only logs that it has no network config. With
// Options.Pods the sections marked {{if .Pods}} make containerd run pods
// here: the sandbox image, runc via the v2 shim, the CNI plugins, and
// restrict_oom_score_adj (test machines may lack CAP_SYS_RESOURCE, without
// which every pod sandbox fails to lower its oom_score_adj) and
// netns_mounts_under_state_dir (pod network namespaces are mounted under
// the run's state dir, which Close unmounts).
//
// 2.x uses config version 3 (what clusters upgraded from 1.x carry; 2.4
// migrates it in memory): CRI image settings live in
// "io.containerd.cri.v1.images", and the transfer service that `ctr` and
// newer pull paths use reads certs.d from "io.containerd.transfer.v1.local".
var containerd2Plugins = template.Must(template.New("c2").Parse(`  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
{{- if .Unprepared}}
    discard_unpacked_layers = true
{{- else}}
    discard_unpacked_layers = false
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "{{.Certs}}"
{{- end}}
{{- if .Pods}}
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "{{.Pods.SandboxImage}}"
{{- end}}

  [plugins."io.containerd.cri.v1.runtime"]
{{- if .Pods}}
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{{.Pods.Runc}}"
{{- end}}
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["{{.CNIBin}}"]
      conf_dir = "{{.CNIConf}}"

  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true

{{- if not .Unprepared}}

  [plugins."io.containerd.transfer.v1.local"]
    config_path = "{{.Certs}}"
{{- end}}
`))

// 1.6 understands config version 2 only; everything CRI sits under
// "io.containerd.grpc.v1.cri". It has no NRI, erofs or blockfile plugins.
var containerd16Plugins = template.Must(template.New("c16").Parse(`  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
{{- if .Pods}}
    sandbox_image = "{{.Pods.SandboxImage}}"
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
{{- end}}
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      discard_unpacked_layers = false
{{- if .Pods}}
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "{{.Pods.Runc}}"
{{- end}}
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{{.Certs}}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{{.CNIBin}}"
      conf_dir = "{{.CNIConf}}"
`))

func containerdConfig(version string, p containerdPaths) ([]byte, error) {
	t, cfg := containerd2Plugins, containerdconfig.Config{Version: 3, Major: 2}
	if version == Containerd16 {
		t, cfg = containerd16Plugins, containerdconfig.Config{Version: 2, Major: 1}
	}
	check := []string{p.Root, p.State, p.Socket, p.Opt, p.Certs, p.CNIConf, p.CNIBin}
	if p.Pods != nil {
		check = append(check, p.Pods.SandboxImage, p.Pods.Runc)
	}
	for _, s := range check {
		if strings.ContainsAny(s, "\"\\\n") {
			return nil, fmt.Errorf("containerd config: path %q cannot go into TOML unquoted", s)
		}
	}
	var b bytes.Buffer
	if err := t.Execute(&b, p); err != nil {
		return nil, err
	}
	cfg.Root, cfg.State, cfg.Socket, cfg.Opt = p.Root, p.State, p.Socket, p.Opt
	cfg.DebugLevel, cfg.Plugins = "info", b.String()
	return []byte(cfg.String()), nil
}
