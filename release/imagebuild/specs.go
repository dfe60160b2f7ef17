package imagebuild

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Where the operator image holds what the operator reads at start: the
// helm-operator layout, with watches.yaml naming charts relative to it.
const (
	OperatorHome     = "/opt/helm"
	OperatorWatches  = OperatorHome + "/watches.yaml"
	OperatorCharts   = OperatorHome + "/helm-charts"
	AgentBinary      = "/usr/local/bin/agent"
	OperatorBinary   = "/usr/local/bin/operator"
	OwnRegistryTeam  = "ghcr.io/fleetmirror"
	DefaultSourceURL = "https://github.com/fleetmirror/fleetmirror"
)

// Specs are fleetmirror's images, for a module rooted at module. The agent
// image also runs the containerd-prep and keepalive commands.
func Specs(module string) map[string]Spec {
	return map[string]Spec{
		"agent": {
			Name:       "agent",
			Repository: OwnRegistryTeam + "/agent",
			Binaries:   map[string]string{AgentBinary: "./cmd/agent"},
			Entrypoint: []string{AgentBinary},
			Title:      "fleetmirror agent",
			Desc:       "Peer-to-peer OCI registry mirror for Kubernetes nodes; also containerd-prep and keepalive",
		},
		"operator": {
			Name:       "operator",
			Repository: OwnRegistryTeam + "/operator",
			Binaries:   map[string]string{OperatorBinary: "./cmd/operator"},
			Files: map[string]string{
				OperatorCharts:  filepath.Join(module, "helm-charts"),
				OperatorWatches: filepath.Join(module, "watches.yaml"),
			},
			Entrypoint: []string{OperatorBinary},
			WorkingDir: OperatorHome,
			Title:      "fleetmirror operator",
			Desc:       "Helm operator that reconciles Spegel resources into the fleetmirror addon",
		},
	}
}

// Check says what a spec needs that is not there (a package not written
// yet, a missing watches.yaml), before anything is compiled.
func (s Spec) Check(module string) error {
	for _, pkg := range s.Binaries {
		if _, err := os.Stat(filepath.Join(module, pkg)); err != nil {
			return fmt.Errorf("image %s: package %s: %w", s.Name, pkg, err)
		}
	}
	for dst, src := range s.Files {
		if _, err := os.Stat(src); err != nil {
			return fmt.Errorf("image %s: %s (for %s in the image): %w", s.Name, src, dst, err)
		}
	}
	return nil
}

// Ref is the image's reference for a version: repository:version.
func (s Spec) Ref(version string) string { return s.Repository + ":" + version }

// WriteLayout writes the index into an OCI image layout folder.
func WriteLayout(dir string, idx v1.ImageIndex) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendIndex(idx)
}

// Push writes the index to ref placed under mirror with imageref.Mirror
// (the operator's imageMirror layout), or to ref itself when mirror is
// empty, and returns where it went, with the digest.
func Push(ctx context.Context, idx v1.ImageIndex, ref, mirror string) (string, error) {
	target := ref
	if mirror != "" {
		var err error
		if target, err = imageref.Mirror(mirror, ref); err != nil {
			return "", err
		}
	}
	r, err := name.NewTag(target)
	if err != nil {
		return "", err
	}
	if err := remote.WriteIndex(r, idx, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return "", fmt.Errorf("push %s: %w", target, err)
	}
	d, err := idx.Digest()
	if err != nil {
		return "", err
	}
	return target + "@" + d.String(), nil
}
