// Package config reads the operator's configuration file, which the
// operator chart renders into a ConfigMap: the images map, imageMirror,
// the provider override in force with its values, node readiness, and
// the namespaces the operator manages.
package config

import (
	"fmt"
	"os"
	"regexp"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/fleetmirror/fleetmirror/operator/values"
)

// Config is the file's content.
type Config struct {
	// Images is the flat images map: key to full reference.
	Images map[string]string `json:"images"`
	// ImageMirror is "host[:port][/prefix]", or empty.
	ImageMirror string `json:"imageMirror"`
	// Provider is the provider override in force.
	Provider Provider `json:"provider"`
	// NodeReadiness holds new nodes back until their agent is ready.
	NodeReadiness NodeReadiness `json:"nodeReadiness"`
	// ManagedNamespaces are the namespaces the chart gave the operator
	// rights in, and so the only ones it watches and acts in; Spegel
	// resources elsewhere are refused with a condition. Empty: every
	// namespace (an operator given cluster-wide rights).
	ManagedNamespaces []string `json:"managedNamespaces"`
	// NodeConditions puts each node's canary verdict on the node as the
	// FleetmirrorMirrorPath condition (the chart grants patch on
	// nodes/status for it).
	NodeConditions bool `json:"nodeConditions"`
}

// Provider names the override file in force (overrides/<name>.yaml) and
// carries its values for every Spegel resource.
type Provider struct {
	Name string `json:"name"`
	// Spegel values lie under every resource's spec.
	Spegel map[string]any `json:"spegel"`
}

// NodeReadiness configures the startup taint.
type NodeReadiness struct {
	Enabled bool `json:"enabled"`
	// ReportAfter is how long a node may wait for its agent before a
	// warning event says why it is still held.
	ReportAfter metav1.Duration `json:"reportAfter"`
	// ReleaseAfter is the most a node is held: past it (from the node's
	// creation) the taint comes off with a warning, whatever its agent says.
	ReleaseAfter metav1.Duration `json:"releaseAfter"`
}

var (
	providerName  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	namespaceName = providerName // both are DNS labels
)

// Load reads and validates path. Unknown keys are refused, so a typo
// names itself instead of being ignored.
func Load(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("operator config: %w", err)
	}
	var c Config
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return Config{}, fmt.Errorf("operator config %s: %w", path, err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("operator config %s: %w", path, err)
	}
	return c, nil
}

// Validate says what is wrong, naming the chart value to fix.
func (c Config) Validate() error {
	if c.Provider.Name != "" && !providerName.MatchString(c.Provider.Name) {
		return fmt.Errorf("provider.name %q: want a lower-case name like nebius or cks", c.Provider.Name)
	}
	for _, ns := range c.ManagedNamespaces {
		if !namespaceName.MatchString(ns) {
			return fmt.Errorf("managedNamespaces: %q is not a namespace name", ns)
		}
	}
	if c.NodeReadiness.ReportAfter.Duration < 0 {
		return fmt.Errorf("nodeReadiness.reportAfter %s: must not be negative", c.NodeReadiness.ReportAfter.Duration)
	}
	if c.NodeReadiness.ReleaseAfter.Duration < 0 {
		return fmt.Errorf("nodeReadiness.releaseAfter %s: must not be negative (a node is never held for good)", c.NodeReadiness.ReleaseAfter.Duration)
	}
	return values.Inputs{Images: c.Images, Mirror: c.ImageMirror, Defaults: c.Provider.Spegel}.Validate()
}

// ReportAfter is NodeReadiness.ReportAfter, 5 minutes when unset.
func (c Config) ReportAfter() time.Duration {
	if d := c.NodeReadiness.ReportAfter.Duration; d > 0 {
		return d
	}
	return 5 * time.Minute
}

// ReleaseAfter is NodeReadiness.ReleaseAfter, 5 minutes when unset.
func (c Config) ReleaseAfter() time.Duration {
	if d := c.NodeReadiness.ReleaseAfter.Duration; d > 0 {
		return d
	}
	return 5 * time.Minute
}
