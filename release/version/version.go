// Package version checks that the one release version, the VERSION file at
// the repository's root, is what every other place that names it says:
// both charts' version and appVersion, and the operator chart's default
// images (which `make images` tags with VERSION).
package version

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"sigs.k8s.io/yaml"
)

// File is the version's one home, relative to the repository's root.
const File = "VERSION"

// Charts are the charts released with every version.
var Charts = []string{"helm-charts/spegel", "helm-charts/operator"}

// semver is what helm package --version accepts without a leading v.
var semver = regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)

// Read returns the version in root's VERSION file, refusing one that is
// not semantic (x.y.z, no leading v).
func Read(root string) (string, error) {
	b, err := os.ReadFile(filepath.Join(root, File))
	if err != nil {
		return "", err
	}
	v := strings.TrimSpace(string(b))
	if !semver.MatchString(v) {
		return "", fmt.Errorf("%s: %q is not a version x.y.z (no leading v)", File, v)
	}
	return v, nil
}

// Check lists every place under root that disagrees with VERSION, each as
// "<file>: <field> is <value>, VERSION is <version>".
func Check(root string) ([]string, error) {
	v, err := Read(root)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, c := range Charts {
		var chart struct {
			Version    string `json:"version"`
			AppVersion string `json:"appVersion"`
		}
		if err := readYAML(filepath.Join(root, c, "Chart.yaml"), &chart); err != nil {
			return nil, err
		}
		for field, got := range map[string]string{"version": chart.Version, "appVersion": chart.AppVersion} {
			if got != v {
				out = append(out, fmt.Sprintf("%s/Chart.yaml: %s is %q, VERSION is %q", c, field, got, v))
			}
		}
	}
	var values struct {
		Images map[string]string `json:"images"`
	}
	if err := readYAML(filepath.Join(root, "helm-charts/operator/values.yaml"), &values); err != nil {
		return nil, err
	}
	for _, name := range []string{"agent", "operator"} {
		ref := values.Images[name]
		if !strings.HasSuffix(ref, ":"+v) {
			out = append(out, fmt.Sprintf("helm-charts/operator/values.yaml: images.%s is %q, want tag %q (VERSION)", name, ref, v))
		}
	}
	return out, nil
}

func readYAML(path string, into any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
