// Package version holds the agent's version, set at link time.
package version

// Version is set with -ldflags -X at build time.
var Version = "dev"
