// Package prep prepares a node's containerd for the mirror: it makes sure
// config.toml points CRI's registry config_path at the certs.d folder the
// agent writes hosts.toml into, and keeps unpacked layers in the content
// store (discard_unpacked_layers = false) so the agent can serve them. It
// edits the file in place, changing only the bytes that must change.
package prep

import (
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// ErrRefused is wrapped by every error that says a node cannot be prepared
// as it is; the message says what was found and what to do.
var ErrRefused = errors.New("containerd config cannot be prepared")

// ErrConfigPathElsewhere is wrapped when config_path already points at
// another folder and Options.OverrideConfigPath is not set.
var ErrConfigPathElsewhere = errors.New("config_path points elsewhere")

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, args...))
}

// Options say what the config must hold.
type Options struct {
	// CertsDir is the folder config_path must name: where the agent
	// writes hosts.toml (its --certs-dir).
	CertsDir string
	// OverrideConfigPath replaces a config_path that names another folder.
	OverrideConfigPath bool
	// MigrateMirrors moves inline `registry.mirrors` entries, which
	// containerd refuses beside config_path, into hosts.toml files under
	// CertsDir (see migrateMirrors) instead of refusing the node.
	MigrateMirrors bool
}

// Setting is one key prep looks after, as found and as wanted.
type Setting struct {
	Table   []string // the table holding Key
	Key     string
	Current any // nil when unset
	Want    any
	OK      bool // Current already does what Want says
}

func (s Setting) String() string {
	cur := "unset"
	if s.Current != nil {
		cur = fmt.Sprintf("%#v", s.Current)
	}
	if s.OK {
		return fmt.Sprintf("%s %s = %#v (ok)", displayTable(s.Table), s.Key, s.Want)
	}
	return fmt.Sprintf("%s %s = %s, want %#v", displayTable(s.Table), s.Key, cur, s.Want)
}

// Plan is what Patch found and the file it would write.
type Plan struct {
	Version  int       // the config's version
	Settings []Setting // before the change
	Patched  []byte    // the new file; equal to the input when nothing changes
	Changed  bool
	// FromEmpty: the file held no keys (containerd's defaults) and is
	// written as version 2 with the settings.
	FromEmpty bool
	// Path is the file read and written: Config.Path, or where its
	// symbolic links lead (set by Check; empty from Patch).
	Path string
	// Hosts are the hosts.toml files that take over the inline mirrors
	// Patched no longer has (Options.MigrateMirrors); Run writes them
	// before the config.
	Hosts []HostsFile
}

// Ready reports whether the file needs no change.
func (p *Plan) Ready() bool { return !p.Changed }

// target is one setting for a config version.
type target struct {
	table []string
	key   string
}

const (
	criV1     = "io.containerd.grpc.v1.cri"       // containerd 1.x CRI, config version 2
	criImages = "io.containerd.cri.v1.images"     // containerd 2.x CRI images, version 3 and 4
	transfer  = "io.containerd.transfer.v1.local" // containerd 2.x transfer service
)

// targets are the settings per config version. Version 2 is what
// containerd 1.6 and 1.7 read; containerd 2.x migrates its registry and
// discard_unpacked_layers into the images plugin when it loads a version 2
// file. Version 3 is containerd 2.0's, version 4 2.1 and later; both keep
// these settings in the same tables. The transfer service reads certs.d
// on its own (ctr and the transfer API use it).
func targets(version int) (configPath []target, discard target) {
	if version == 2 {
		return []target{{[]string{"plugins", criV1, "registry"}, "config_path"}},
			target{[]string{"plugins", criV1, "containerd"}, "discard_unpacked_layers"}
	}
	return []target{
			{[]string{"plugins", criImages, "registry"}, "config_path"},
			{[]string{"plugins", transfer}, "config_path"},
		},
		target{[]string{"plugins", criImages}, "discard_unpacked_layers"}
}

// maxVersion is the newest config version this code knows the tables of
// (containerd 2.4 writes 4).
const maxVersion = 4

// Patch returns the plan for one config.toml. It refuses (ErrRefused) input
// it cannot patch safely and never returns a file that does not parse or
// in which anything but the settings it manages differs from the input.
func Patch(src []byte, o Options) (*Plan, error) {
	if o.CertsDir == "" || !filepath.IsAbs(o.CertsDir) {
		return nil, fmt.Errorf("certs dir %q: want an absolute path, e.g. /etc/containerd/certs.d", o.CertsDir)
	}
	orig := src
	before, src, fromEmpty, err := decode(src)
	if err != nil {
		return nil, err
	}
	doc, err := parseDocument(src)
	if err != nil {
		return nil, refuse("the file does not parse as TOML (%v)", err)
	}
	version, err := configVersion(before)
	if err != nil {
		return nil, err
	}
	mirrorTables, err := checkLayout(before, version, o)
	if err != nil {
		return nil, err
	}
	plan := &Plan{Version: version, FromEmpty: fromEmpty, Settings: settings(before, version, o)}
	out, doc, err := migrate(plan, before, mirrorTables, src, doc, o)
	if err != nil {
		return nil, err
	}
	if out, err = apply(plan, out, doc, o); err != nil {
		return plan, err
	}
	if err := verify(src, out, plan.Settings, mirrorTables); err != nil {
		return plan, err
	}
	plan.Patched = out
	plan.Changed = string(out) != string(orig)
	return plan, nil
}

// decode reads src as TOML. A file without keys (empty, blank or only
// comments) is containerd's defaults: it comes back with a version line
// added, and fromEmpty set.
func decode(src []byte) (before map[string]any, out []byte, fromEmpty bool, err error) {
	if err := toml.Unmarshal(src, &before); err != nil {
		return nil, nil, false, refuse("the file does not parse as TOML (%s); fix it (containerd would not start with it either)", parseError(err))
	}
	if len(before) > 0 {
		return before, src, false, nil
	}
	// Version 2 is the header every supported containerd reads: 1.6 and
	// 1.7 natively, 2.x by migrating it on load, so the tables added below
	// mean the same on either.
	return map[string]any{"version": int64(2)}, insertLine(src, len(src), "version = 2"), true, nil
}

// migrate moves the inline mirrors of mirrorTables out of src into
// plan.Hosts (hosts.toml files) and returns src without them, scanned again.
func migrate(plan *Plan, before map[string]any, mirrorTables [][]string, src []byte, doc *document, o Options) ([]byte, *document, error) {
	seen := map[string]string{}
	for _, t := range mirrorTables {
		files, err := migrateMirrors(t, lookup(before, append(t, "mirrors")).(map[string]any), o.CertsDir)
		if err != nil {
			return nil, nil, err
		}
		for _, f := range files {
			if prev, ok := seen[f.Dir]; ok {
				return nil, nil, refuse("both %s and %s are mirrors for %q; keep one and run prep again", prev, displayTable(f.Table), f.Registry)
			}
			seen[f.Dir] = displayTable(f.Table)
		}
		plan.Hosts = append(plan.Hosts, files...)
		src = removeTree(src, doc, append(t, "mirrors"))
		if doc, err = parseDocument(src); err != nil {
			return nil, nil, fmt.Errorf("internal error: file without mirrors does not scan: %v", err)
		}
	}
	return src, doc, nil
}

// settings lists the keys prep sets, with their current values in before.
func settings(before map[string]any, version int, o Options) []Setting {
	cps, discard := targets(version)
	// discard first: its table is the parent of the registry table in
	// version 3, and a new parent reads better above its child.
	cur := lookup(before, append(discard.table, discard.key))
	out := []Setting{{Table: discard.table, Key: discard.key, Current: cur, Want: false, OK: cur == false}}
	for _, t := range cps {
		cur := lookup(before, append(t.table, t.key))
		out = append(out, Setting{Table: t.table, Key: t.key, Current: cur, Want: o.CertsDir, OK: namesDir(cur, o.CertsDir, version)})
	}
	return out
}

// apply edits src for each setting of plan that is not OK yet, refusing
// values it should not overwrite.
func apply(plan *Plan, src []byte, doc *document, o Options) ([]byte, error) {
	var err error
	for _, s := range plan.Settings {
		if s.OK {
			continue
		}
		if s.Key == "config_path" {
			if err := checkConfigPath(s, o, plan.Version); err != nil {
				return nil, err
			}
		} else if s.Current != nil {
			if _, ok := s.Current.(bool); !ok {
				return nil, refuse("%s %s is %#v, not true or false; fix it by hand", displayTable(s.Table), s.Key, s.Current)
			}
		}
		if src, err = set(src, doc, s.Table, s.Key, s.Want); err != nil {
			return nil, err
		}
		// Positions moved: scan the edited file again for the next edit.
		if doc, err = parseDocument(src); err != nil {
			return nil, fmt.Errorf("internal error: patched file does not scan: %v", err)
		}
	}
	return src, nil
}

// parseError names the line and column of a TOML error, so the file can
// be fixed without a TOML linter.
func parseError(err error) string {
	var de *toml.DecodeError
	if !errors.As(err, &de) {
		return err.Error()
	}
	row, col := de.Position()
	return fmt.Sprintf("line %d, column %d: %s", row, col, strings.TrimPrefix(de.Error(), "toml: "))
}

// configVersion reads the top-level version. containerd 1.x reads a file
// without one as version 1 and 2.x migrates version 1 on the fly; the
// plugin names differ there ("cri" instead of "io.containerd.grpc.v1.cri"),
// so such files are refused rather than guessed at.
func configVersion(m map[string]any) (int, error) {
	v, ok := m["version"]
	if !ok {
		return 0, refuse("the file has no `version` line, so containerd reads it as config version 1, whose plugin names this tool does not edit; " +
			"migrate it first: `containerd config migrate` (containerd 2.x) or rewrite it as `version = 2` (containerd 1.6/1.7)")
	}
	n, ok := v.(int64)
	if !ok {
		return 0, refuse("`version = %#v` is not a number; containerd wants 2 (1.6/1.7), 3 or 4 (2.x)", v)
	}
	switch {
	case n == 1:
		return 0, refuse("config version 1 is the old containerd 1.x layout; migrate it first: `containerd config migrate` (containerd 2.x) or rewrite it as `version = 2`")
	case n >= 2 && n <= maxVersion:
		return int(n), nil
	default:
		return 0, refuse("config version %d is not one this agent knows (2 for containerd 1.6/1.7, 3 and 4 for 2.x); update the agent", n)
	}
}

// checkLayout refuses configurations that containerd would reject, or
// misread, once config_path is set. It returns the registry tables whose
// inline mirrors are to be migrated (only with o.MigrateMirrors).
func checkLayout(m map[string]any, version int, o Options) ([][]string, error) {
	regTables := [][]string{{"plugins", criV1, "registry"}}
	if version >= 3 {
		regTables = append(regTables, []string{"plugins", criImages, "registry"})
		// containerd 2.4 migrates a version 3 file by copying the 1.x
		// CRI registry table over the images plugin's one: settings there
		// would silently win over ours.
		if version < maxVersion {
			for _, k := range [][]string{{"plugins", criV1, "registry"}, {"plugins", criV1, "containerd", "discard_unpacked_layers"}} {
				if lookup(m, k) != nil {
					return nil, refuse("this version %d file still sets %s, which containerd 2.4 copies over [plugins.%q] on load; move its settings there and remove it",
						version, strings.Join(k, "."), criImages)
				}
			}
		}
	}
	var migrate [][]string
	for _, t := range regTables {
		// containerd refuses `configs.tls` beside config_path too (its
		// auth may stay: containerd still reads it by host).
		if configs, ok := lookup(m, append(t, "configs")).(map[string]any); ok {
			names := make([]string, 0, len(configs))
			for n := range configs {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				if lookup(configs, []string{n, "tls"}) != nil {
					return nil, refuse("%s sets tls, and containerd refuses `configs.tls` together with `config_path`; move it to %s as ca, client or skip_verify (containerd's hosts.toml) and remove the tls table",
						displayTable(append(append([]string{}, t...), "configs", n, "tls")), filepath.Join(o.CertsDir, hostsDir(n), "hosts.toml"))
				}
			}
		}
		mirrors, ok := lookup(m, append(t, "mirrors")).(map[string]any)
		if !ok || len(mirrors) == 0 {
			continue
		}
		if !o.MigrateMirrors {
			return nil, refuse("%s has `mirrors` entries, and containerd refuses `mirrors` together with `config_path`; run prep with --migrate-mirrors (chart value containerdPrep.migrateMirrors) to move them into hosts.toml files under %s, or move them there by hand and remove the mirrors table",
				displayTable(t), o.CertsDir)
		}
		migrate = append(migrate, t)
	}
	return migrate, nil
}

// removeTree deletes every line that defines path or something under it:
// its table headers and their keys, and dotted or inline keys.
func removeTree(src []byte, d *document, path []string) []byte {
	out := src
	for i := len(d.exprs) - 1; i >= 0; i-- {
		if e := d.exprs[i]; hasPrefix(e.path, path) {
			out = splice(out, e.lineStart, e.lineEnd, "")
		}
	}
	return out
}

func checkConfigPath(s Setting, o Options, version int) error {
	cur, isString := s.Current.(string)
	if s.Current != nil && !isString {
		return refuse("%s config_path is %#v, not a string; fix it by hand", displayTable(s.Table), s.Current)
	}
	if cur == "" || o.OverrideConfigPath {
		return nil
	}
	if dirs := filepath.SplitList(cur); len(dirs) > 1 && namesDir(dirs[0], o.CertsDir, 2) {
		return fmt.Errorf("%w: %w: %s config_path is the list %q: from containerd 2.1, CRI pulls go through the transfer service by default, which reads config_path as one folder, "+
			"so containerd reads no hosts.toml at all (containerd/containerd#12415); move what the other folders hold into %s and run prep with --override-config-path, which sets %q alone",
			ErrRefused, ErrConfigPathElsewhere, displayTable(s.Table), cur, o.CertsDir, o.CertsDir)
	}
	return fmt.Errorf("%w: %w: %s config_path is %q; either run the agent with --certs-dir=%s (the chart's certsDir) so it writes hosts.toml where containerd looks, or run prep with --override-config-path to point containerd at %s",
		ErrRefused, ErrConfigPathElsewhere, displayTable(s.Table), cur, filepath.SplitList(cur)[0], o.CertsDir)
}

// namesDir reports whether config_path value v has containerd look in dir
// first. containerd 1.x reads a list like $PATH; 2.x files (version 3 and
// later) must name dir alone, since from 2.1 the transfer service, which
// CRI pulls go through, takes the whole value as one folder.
func namesDir(v any, dir string, version int) bool {
	s, ok := v.(string)
	if !ok || s == "" {
		return false
	}
	dirs := filepath.SplitList(s)
	if version >= 3 && len(dirs) > 1 {
		return false
	}
	return filepath.Clean(dirs[0]) == filepath.Clean(dir)
}

// lookup returns the value at path, nil when absent.
func lookup(m map[string]any, path []string) any {
	var cur any = m
	for _, k := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		if cur, ok = mm[k]; !ok {
			return nil
		}
	}
	return cur
}

// assign sets path in m, creating tables on the way; false when a value
// on the way is not a table.
func assign(m map[string]any, path []string, v any) bool {
	for _, k := range path[:len(path)-1] {
		next, ok := m[k]
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		if m, ok = next.(map[string]any); !ok {
			return false
		}
	}
	m[path[len(path)-1]] = v
	return true
}

// verify proves the patched file reads as intended: it parses, and it
// equals the original with exactly the managed settings assigned and the
// migrated mirrors tables gone.
func verify(src, out []byte, settings []Setting, removed [][]string) error {
	var after, want map[string]any
	if err := toml.Unmarshal(out, &after); err != nil {
		return refuse("the patched file would not parse (%v); the layout is too unusual to edit safely, set the keys by hand: %s", err, describe(settings))
	}
	if err := toml.Unmarshal(src, &want); err != nil {
		return fmt.Errorf("internal error: the config parsed once but not twice: %v", err)
	}
	for _, t := range removed {
		reg, _ := lookup(want, t).(map[string]any)
		delete(reg, "mirrors")
		// A registry table that only held mirrors goes with them.
		if len(reg) == 0 && lookup(after, t) == nil {
			if parent, ok := lookup(want, t[:len(t)-1]).(map[string]any); ok {
				delete(parent, t[len(t)-1])
			}
		}
	}
	for _, s := range settings {
		if s.OK {
			continue
		}
		if !assign(want, append(s.Table, s.Key), s.Want) {
			return refuse("%s is not a table in this file; set the keys by hand: %s", displayTable(s.Table), describe(settings))
		}
	}
	if !reflect.DeepEqual(want, after) {
		return refuse("editing the file would change more than the managed settings (the layout is too unusual to edit safely); set them by hand: %s", describe(settings))
	}
	return nil
}

func describe(settings []Setting) string {
	var parts []string
	for _, s := range settings {
		parts = append(parts, fmt.Sprintf("%s %s = %#v", displayTable(s.Table), s.Key, s.Want))
	}
	return strings.Join(parts, "; ")
}

// set makes table.key read v, by the smallest edit of src.
func set(src []byte, d *document, table []string, key string, v any) ([]byte, error) {
	full := append(append([]string{}, table...), key)
	if out, done, err := replaceValue(src, d, table, full, v); done {
		return out, err
	}
	val := d.renderValue(v)
	if out, ok := appendToTable(src, d, table, key, val); ok {
		return out, nil
	}
	if out, ok := appendDotted(src, d, table, full, val); ok {
		return out, nil
	}
	return addTable(src, d, table, key, val), nil
}

// replaceValue replaces the value of key full (table and key) where it is
// set; done is false when it is not set and nothing on the way to it keeps
// set from adding it. Anything on the way that is not a plain table (an
// inline table, an array of tables, a scalar) cannot take a key by a local
// edit.
func replaceValue(src []byte, d *document, table, full []string, v any) (out []byte, done bool, err error) {
	key := full[len(full)-1]
	for _, e := range d.exprs {
		switch {
		case e.kind == unstable.ArrayTable && hasPrefix(full, e.path):
			return nil, true, refuse("line %d: %s is an array of tables; set %s %s by hand", e.line(d.src), displayTable(e.path), displayTable(table), key)
		case e.kind == unstable.KeyValue && slices.Equal(e.path, full):
			val := d.renderValue(v)
			// Keep the quoting the value had.
			if q := src[e.valStart]; q == '"' || q == '\'' {
				val = (&document{singleQuotes: q == '\''}).renderValue(v)
			}
			return splice(src, e.valStart, e.end, val), true, nil
		case e.kind == unstable.KeyValue && hasPrefix(full, e.path):
			return nil, true, refuse("line %d: %s is written inline (%s = ...); write it as a [table] or set %s by hand",
				e.line(d.src), strings.Join(e.path, "."), d.renderKey(e.path[len(e.path)-e.keyLen:]), key)
		}
	}
	return nil, false, nil
}

// appendToTable adds key after the last key/value of table's header, when
// table has one.
func appendToTable(src []byte, d *document, table []string, key, val string) ([]byte, bool) {
	for i, e := range d.exprs {
		if e.kind != unstable.Table || !slices.Equal(e.path, table) {
			continue
		}
		last, indent := e, e.indent+d.step
		for _, k := range d.exprs[i+1:] {
			if k.kind != unstable.KeyValue {
				break
			}
			last, indent = k, k.indent
		}
		return insertLine(src, last.lineEnd, indent+d.renderKey([]string{key})+" = "+val), true
	}
	return nil, false
}

// appendDotted adds key as another dotted key next to the last one, when
// table exists only through dotted keys (registry.x = ... under its parent).
func appendDotted(src []byte, d *document, table, full []string, val string) ([]byte, bool) {
	var dotted *expr
	for i, e := range d.exprs {
		// Only keys whose dotted part names the table, not keys under a
		// header for one of its sub-tables.
		if e.kind == unstable.KeyValue && hasPrefix(e.path, table) && len(e.path)-e.keyLen < len(table) {
			dotted = &d.exprs[i]
		}
	}
	if dotted == nil {
		return nil, false
	}
	base := len(dotted.path) - dotted.keyLen
	return insertLine(src, dotted.lineEnd, dotted.indent+d.renderKey(full[base:])+" = "+val), true
}

// addTable adds table's header and key after the block of its closest
// ancestor that has a header (or at the end of the file).
func addTable(src []byte, d *document, table []string, key, val string) []byte {
	parent, depth := -1, 0
	for i, e := range d.exprs {
		if e.kind == unstable.Table && len(e.path) < len(table) && hasPrefix(table, e.path) && len(e.path) >= depth {
			parent, depth = i, len(e.path)
		}
	}
	at, indent := len(src), ""
	if parent >= 0 {
		p := d.exprs[parent]
		at = p.lineEnd
		for _, e := range d.exprs[parent+1:] {
			if e.kind != unstable.KeyValue && !hasPrefix(e.path, p.path) {
				break
			}
			at = e.lineEnd
		}
		indent = p.indent
		if d.indented {
			indent += strings.Repeat("  ", len(table)-len(p.path))
		}
	} else if n := len(d.exprs); n > 0 {
		at = d.exprs[n-1].lineEnd
	}
	block := "\n" + indent + "[" + d.renderKey(table) + "]\n" + indent + d.step + d.renderKey([]string{key}) + " = " + val
	return insertLine(src, at, block)
}

func (d *document) renderValue(v any) string {
	switch v := v.(type) {
	case string:
		return d.renderString(v)
	case bool:
		return strconv.FormatBool(v)
	}
	panic(fmt.Sprintf("prep: cannot render %T", v))
}

func splice(src []byte, from, to int, repl string) []byte {
	out := make([]byte, 0, len(src)+len(repl))
	out = append(out, src[:from]...)
	out = append(out, repl...)
	return append(out, src[to:]...)
}

// insertLine inserts line (without its newline) at offset at, which is the
// start of a line or the end of the file; the file's line ending is kept.
func insertLine(src []byte, at int, line string) []byte {
	nl := "\n"
	if strings.Contains(string(src), "\r\n") {
		nl = "\r\n"
		line = strings.ReplaceAll(line, "\n", "\r\n")
	}
	var b strings.Builder
	b.Write(src[:at])
	if at > 0 && src[at-1] != '\n' {
		b.WriteString(nl)
	}
	b.WriteString(line)
	b.WriteString(nl)
	b.Write(src[at:])
	return []byte(b.String())
}
