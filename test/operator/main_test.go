// Package operator tests the addon chart and the operator against a real
// kube-apiserver and etcd (built by hack/tools.sh), with the operator's
// manager running in the test process.
package operator

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

var (
	repoRoot string
	cfg      *rest.Config // nil when the control plane could not start
	startErr error
)

func TestMain(m *testing.M) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Join(filepath.Dir(file), "..", "..")
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(repoRoot, "crds")},
		ErrorIfCRDPathMissing: true,
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		tools := os.Getenv("FLEETMIRROR_TOOLS")
		if tools == "" {
			tools = "/var/cache/fleetmirror/tools"
		}
		env.ControlPlane.GetAPIServer().Path = filepath.Join(tools, "kube-v1.34.4", "bin", "kube-apiserver")
		env.ControlPlane.Etcd = &envtest.Etcd{Path: filepath.Join(tools, "etcd-v3.6.16", "bin", "etcd")}
	}
	cfg, startErr = env.Start()
	if startErr != nil {
		startErr = fmt.Errorf("starting kube-apiserver and etcd (run `make tools`): %w", startErr)
	}
	code := m.Run()
	if cfg != nil {
		if err := env.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping control plane:", err)
		}
	}
	os.Exit(code)
}

// needCluster fails the test when the control plane is not there: these
// tests are part of `make test`, never silently skipped.
func needCluster(t *testing.T) {
	t.Helper()
	if startErr != nil {
		t.Fatal(startErr)
	}
}
