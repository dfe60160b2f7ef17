package prep

import (
	"bytes"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/fleetmirror/fleetmirror/agent/internal/tomlstr"
)

// document is a TOML file as a list of its top-level expressions with their
// byte positions, so that edits can touch only the bytes that must change
// and leave comments, order and formatting as they were.
type document struct {
	src   []byte
	exprs []expr
	// singleQuotes: the file writes quoted keys with single quotes
	// ([plugins.'io.containerd.cri.v1.images'], as containerd 2.x does).
	singleQuotes bool
	// indented: some table header is indented (containerd's own style).
	indented bool
	// step is how much deeper than its header a table's first key sits.
	step string
}

// expr is one table header or key/value line.
type expr struct {
	kind unstable.Kind // Table, ArrayTable or KeyValue
	// path is the table's name, or for a key/value the table it sits in
	// followed by its (possibly dotted) key.
	path []string
	// section is the index of the header this key/value sits under, -1
	// for the root table. For headers: their own index.
	section int
	// keyLen is how many parts of path the key itself has (key/values).
	keyLen    int
	lineStart int // offset of the line the expression starts on
	start     int // offset of '[' or of the key
	end       int // offset after the value or after ']'
	lineEnd   int // offset after the '\n' ending the expression's last line
	valStart  int // key/values: offset of the value
	valKind   unstable.Kind
	indent    string
}

func (e expr) line(src []byte) int { return lineOf(src, e.start) }

// parseDocument scans src with go-toml's parser, which reports byte ranges.
// Syntax errors come back with the line they are on.
func parseDocument(src []byte) (*document, error) {
	s := docScan{d: &document{src: src}, section: -1}
	var p unstable.Parser
	p.Reset(src)
	for p.NextExpression() {
		n := p.Expression()
		var e expr
		var err error
		switch n.Kind {
		case unstable.Table, unstable.ArrayTable:
			e, err = s.header(n)
		case unstable.KeyValue:
			e, err = s.keyValue(n)
		default:
			continue
		}
		if err != nil {
			return nil, err
		}
		if err := s.add(e); err != nil {
			return nil, err
		}
	}
	if err := p.Error(); err != nil {
		return nil, describeParseError(&p, err)
	}
	s.d.singleQuotes = s.singles > s.doubles
	return s.d, nil
}

// docScan is parseDocument's state between expressions.
type docScan struct {
	d       *document
	table   []string // the current table's name
	section int      // index of the current header, -1 for the root table
	// The file's quoting style, judged by its quoted keys: strings we
	// write follow it (see renderString).
	singles, doubles int
	stepSeen         bool
}

func (s *docScan) countQuotes(keys []unstable.Range) {
	for _, k := range keys {
		switch s.d.src[k.Offset] {
		case '\'':
			s.singles++
		case '"':
			s.doubles++
		}
	}
}

// header locates a table or array-table header and makes it the current
// table.
func (s *docScan) header(n *unstable.Node) (expr, error) {
	src := s.d.src
	keys, first, last := keyParts(n.Key())
	s.countQuotes(keys)
	s.table = first
	// The '[' (or '[[') precedes the first key part, maybe after blanks.
	open := bytes.LastIndexByte(src[:keys[0].Offset], '[')
	if n.Kind == unstable.ArrayTable {
		open--
	}
	closeAt := bytes.IndexByte(src[last:], ']')
	if open < 0 || closeAt < 0 {
		return expr{}, fmt.Errorf("line %d: cannot locate table header", lineOf(src, int(keys[0].Offset)))
	}
	end := last + closeAt + 1
	if n.Kind == unstable.ArrayTable {
		end++
	}
	s.section = len(s.d.exprs)
	return expr{kind: n.Kind, path: first, section: s.section, start: open, end: end}, nil
}

// keyValue locates a key/value line and its value in the current table.
func (s *docScan) keyValue(n *unstable.Node) (expr, error) {
	src := s.d.src
	keys, parts, last := keyParts(n.Key())
	s.countQuotes(keys)
	start := int(keys[0].Offset)
	end := int(n.Raw.Offset + n.Raw.Length)
	eq := bytes.IndexByte(src[last:end], '=')
	if eq < 0 {
		return expr{}, fmt.Errorf("line %d: cannot locate '='", lineOf(src, start))
	}
	vs := last + eq + 1
	for vs < end && (src[vs] == ' ' || src[vs] == '\t') {
		vs++
	}
	path := append(append([]string{}, s.table...), parts...)
	return expr{kind: n.Kind, path: path, section: s.section, keyLen: len(parts), start: start, end: end,
		valStart: vs, valKind: n.Value().Kind}, nil
}

// add fills in e's line bounds and indent, notes the file's indent style
// and appends e.
func (s *docScan) add(e expr) error {
	d := s.d
	e.lineStart = bytes.LastIndexByte(d.src[:e.start], '\n') + 1
	e.indent = string(d.src[e.lineStart:e.start])
	if strings.Trim(e.indent, " \t") != "" {
		// Something other than blanks before the expression on its
		// line would be a second expression on one line: TOML does
		// not allow that, so the parser and we disagree.
		return fmt.Errorf("line %d: unexpected text before %q", lineOf(d.src, e.start), strings.Join(e.path, "."))
	}
	if nl := bytes.IndexByte(d.src[e.end:], '\n'); nl >= 0 {
		e.lineEnd = e.end + nl + 1
	} else {
		e.lineEnd = len(d.src)
	}
	if e.kind != unstable.KeyValue && e.indent != "" {
		d.indented = true
	}
	if n := len(d.exprs); !s.stepSeen && n > 0 && e.kind == unstable.KeyValue && d.exprs[n-1].kind == unstable.Table {
		d.step, s.stepSeen = strings.TrimPrefix(e.indent, d.exprs[n-1].indent), true
	}
	d.exprs = append(d.exprs, e)
	return nil
}

// keyParts returns the ranges and decoded parts of a key, and the offset
// after its last part.
func keyParts(it unstable.Iterator) (ranges []unstable.Range, parts []string, end int) {
	for it.Next() {
		k := it.Node()
		ranges = append(ranges, k.Raw)
		parts = append(parts, string(k.Data))
		end = int(k.Raw.Offset + k.Raw.Length)
	}
	return ranges, parts, end
}

// lineOf is the 1-based line number of offset off in src.
func lineOf(src []byte, off int) int { return bytes.Count(src[:off], []byte("\n")) + 1 }

func describeParseError(p *unstable.Parser, err error) error {
	if perr, ok := err.(*unstable.ParserError); ok && len(perr.Highlight) > 0 {
		func() {
			// Highlight is normally a slice of the input; Range panics
			// when it is not, and then the plain message must do.
			defer func() { _ = recover() }()
			s := p.Shape(p.Range(perr.Highlight))
			err = fmt.Errorf("line %d column %d: %s", s.Start.Line, s.Start.Column, perr.Message)
		}()
	}
	return err
}

// hasPrefix reports whether path starts with prefix.
func hasPrefix(path, prefix []string) bool {
	return len(prefix) <= len(path) && slices.Equal(path[:len(prefix)], prefix)
}

var bareKey = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// renderKey writes a dotted key in the file's quoting style.
func (d *document) renderKey(parts []string) string {
	out := make([]string, len(parts))
	for i, p := range parts {
		if bareKey.MatchString(p) {
			out[i] = p
		} else {
			out[i] = d.renderString(p)
		}
	}
	return strings.Join(out, ".")
}

// renderString writes s as a TOML string: a literal string in files that
// use single quotes (when s allows it), else a basic string.
func (d *document) renderString(s string) string {
	if d.singleQuotes && !strings.ContainsAny(s, "'\n\r") && !tomlstr.HasControl(s) {
		return "'" + s + "'"
	}
	return tomlstr.Basic(s)
}

// displayTable names a table the way containerd's docs write it.
func displayTable(path []string) string {
	d := &document{}
	return "[" + d.renderKey(path) + "]"
}
