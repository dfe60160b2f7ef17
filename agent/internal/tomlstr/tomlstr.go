// Package tomlstr writes strings as TOML, for the agent's edits of
// containerd's config.toml (prep) and hosts.toml (hosts).
package tomlstr

import (
	"fmt"
	"strings"
)

// Basic returns s as a TOML basic string: quoted, with quotes and
// backslashes escaped and control characters as \uXXXX.
func Basic(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case isControl(r):
			fmt.Fprintf(&b, `\u%04X`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// HasControl reports whether s holds a control character, which Basic
// escapes and a TOML literal string cannot hold.
func HasControl(s string) bool {
	return strings.ContainsFunc(s, isControl)
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }
