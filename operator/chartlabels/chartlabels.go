// Package chartlabels names the labels the spegel chart puts on its
// objects (its _helpers.tpl), by which the operator finds a release's
// DaemonSets and agent pods: one place, so a chart change is one edit.
package chartlabels

const (
	Name      = "app.kubernetes.io/name"
	Component = "app.kubernetes.io/component"
	PartOf    = "app.kubernetes.io/part-of"
	Instance  = "app.kubernetes.io/instance"
	ManagedBy = "app.kubernetes.io/managed-by"
	// Fleetmirror is PartOf's value on every object of the chart.
	Fleetmirror = "fleetmirror"
)
