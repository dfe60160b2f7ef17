package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoad(t *testing.T) {
	good := `images:
  agent: ghcr.io/fleetmirror/agent:v1
  operator: ghcr.io/fleetmirror/operator:v1
imageMirror: registry.corp:5000/mirror/
provider:
  name: cks
  spegel:
    resources: {limits: {memory: 256Mi}}
nodeReadiness: {enabled: true, reportAfter: 90s}
managedNamespaces: [spegel, kube-system]
`
	for _, tc := range []struct{ name, body, wantErr string }{
		{"good", good, ""},
		{"typo", strings.Replace(good, "imageMirror", "imageMiror", 1), "imageMiror"},
		{"missing agent", strings.Replace(good, "  agent: ghcr.io/fleetmirror/agent:v1\n", "", 1), "images.agent"},
		{"bad image", strings.Replace(good, "agent:v1", "Agent:v1", 1), "images.agent"},
		{"bad mirror", strings.Replace(good, "registry.corp:5000/mirror/", "https://registry.corp", 1), "imageMirror"},
		{"bad provider", strings.Replace(good, "name: cks", "name: CKS!", 1), "provider.name"},
		{"bad namespace", strings.Replace(good, "kube-system", "Kube_System", 1), "managedNamespaces"},
		{"bad duration", strings.Replace(good, "90s", "soon", 1), "soon"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "operator.yaml")
			if err := os.WriteFile(p, []byte(tc.body), 0o644); err != nil {
				t.Fatal(err)
			}
			c, err := Load(p)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Provider.Name != "cks" || !c.NodeReadiness.Enabled || c.ReportAfter().String() != "1m30s" || c.Images["agent"] == "" || len(c.ManagedNamespaces) != 2 {
				t.Fatalf("read %+v", c)
			}
		})
	}
}
