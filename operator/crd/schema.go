package crd

import (
	"fmt"
	"sort"
	"strings"
)

// helmOnly are top-level chart values that are Helm's, not the chart's:
// `global` is the values Helm shares with subcharts (the chart has none),
// so a Spegel spec has no use for it.
var helmOnly = map[string]bool{"global": true}

// copied are JSON Schema keywords that mean the same in a CRD's OpenAPI v3
// schema and are copied as they are.
var copied = []string{
	"description", "pattern", "format", "minLength", "maxLength", "minimum", "maximum",
	"multipleOf", "minItems", "maxItems", "minProperties", "maxProperties", "enum",
}

// dropped are keywords that say nothing the API server checks.
var dropped = map[string]bool{"$schema": true, "$comment": true, "title": true, "examples": true, "definitions": true}

// converter turns one JSON Schema (draft-07, as Helm validates values) into
// a structural schema; defs are the root's definitions, for $ref.
type converter struct {
	defs map[string]any
}

// SpecProperties converts the chart's values schema into the properties of
// the CRD's spec, keyed by value name.
func SpecProperties(chartSchema map[string]any) (map[string]any, error) {
	c := converter{}
	c.defs, _ = chartSchema["definitions"].(map[string]any)
	props, ok := chartSchema["properties"].(map[string]any)
	if !ok || len(props) == 0 {
		return nil, fmt.Errorf("the chart's schema has no properties")
	}
	out := map[string]any{}
	for _, k := range sortedKeys(props) {
		if helmOnly[k] {
			continue
		}
		s, _ := props[k].(map[string]any)
		// Spec fields lie over the chart's defaults, key by key: a required
		// key may be left out of the spec, since the chart's values.yaml
		// (or the images map) holds it.
		p, err := c.convert(s, "."+k, false)
		if err != nil {
			return nil, err
		}
		out[k] = p
	}
	return out, nil
}

// convert returns the structural schema for s at path. inList is true below
// a list's items: lists replace the chart's default whole, so there (and
// only there) `required` still means what it says.
func (c converter) convert(s map[string]any, path string, inList bool) (map[string]any, error) {
	if s == nil {
		return nil, fmt.Errorf("%s: not a schema", path)
	}
	s, err := c.resolve(s, path)
	if err != nil {
		return nil, err
	}
	out, err := keywords(s, path, inList)
	if err != nil {
		return nil, err
	}
	typ, err := c.typeOf(s, path)
	if err != nil {
		return nil, err
	}
	switch typ {
	case "":
		// Any JSON value (a quantity: string, integer or number); the chart
		// checks it. Value checks (pattern, maxLength) still apply to strings.
		out["x-kubernetes-preserve-unknown-fields"] = true
	case "int-or-string":
		out["x-kubernetes-int-or-string"] = true
		out["anyOf"] = []any{map[string]any{"type": "integer"}, map[string]any{"type": "string"}}
	default:
		out["type"] = typ
	}
	if err := c.object(s, out, typ, path, inList); err != nil {
		return nil, err
	}
	if err := c.items(s, out, path); err != nil {
		return nil, err
	}
	for _, j := range []string{"anyOf", "oneOf"} {
		if bs, ok := s[j]; ok {
			if out[j], err = c.branches(bs, typ, path+"."+j, inList); err != nil {
				return nil, err
			}
		}
	}
	if err := bounded(out, typ, path); err != nil {
		return nil, err
	}
	return out, nil
}

// keywords converts s's keywords but the ones that hold schemas (type,
// properties, additionalProperties, items, anyOf, oneOf: see convert).
func keywords(s map[string]any, path string, inList bool) (map[string]any, error) {
	out := map[string]any{}
	for _, k := range sortedKeys(s) {
		v := s[k]
		switch {
		case contains(copied, k):
			out[k] = v
		case dropped[k]:
		case k == "type", k == "properties", k == "additionalProperties", k == "items", k == "anyOf", k == "oneOf":
			// convert's
		case k == "const":
			out["enum"] = []any{v}
		case k == "required":
			if inList {
				out[k] = v
			}
		case k == "uniqueItems":
			// A CRD may not say uniqueItems (checking it is quadratic); a
			// list of scalars that is a set says so instead, which the API
			// server checks.
			if v == true {
				out["x-kubernetes-list-type"] = "set"
			}
		case k == "exclusiveMinimum", k == "exclusiveMaximum":
			// draft-07 gives the bound; OpenAPI v3.0 a flag on minimum/maximum.
			n, ok := v.(float64)
			if !ok {
				return nil, fmt.Errorf("%s: %s must be a number", path, k)
			}
			bound := "minimum"
			if k == "exclusiveMaximum" {
				bound = "maximum"
			}
			out[bound], out[k] = n, true
		case k == "default":
			// The API server would write a CRD default into every spec, and
			// it would then beat the provider override (chart defaults <
			// provider override < spec): defaults live in values.yaml only.
			return nil, fmt.Errorf("%s: default: defaults belong in values.yaml; a default in the CRD would override the provider override", path)
		default:
			return nil, fmt.Errorf("%s: %q cannot be expressed in a CRD's structural schema; use the keywords crdgen converts (see operator/crd)", path, k)
		}
	}
	return out, nil
}

// object converts s's properties and additionalProperties into out.
func (c converter) object(s, out map[string]any, typ, path string, inList bool) error {
	var err error
	if props, ok := s["properties"].(map[string]any); ok {
		cp := map[string]any{}
		for _, k := range sortedKeys(props) {
			p, _ := props[k].(map[string]any)
			if cp[k], err = c.convert(p, path+"."+k, inList); err != nil {
				return err
			}
		}
		out["properties"] = cp
	}
	switch ap := s["additionalProperties"].(type) {
	case nil:
		if typ == "object" {
			// JSON Schema keeps keys it does not name; a CRD prunes them
			// unless told not to.
			out["x-kubernetes-preserve-unknown-fields"] = true
		}
	case bool:
		// false: the API server prunes (and with field validation Strict
		// refuses) keys the properties do not name, which is what false
		// asks; a CRD may not say it beside properties.
		if ap {
			out["x-kubernetes-preserve-unknown-fields"] = true
		}
	case map[string]any:
		if _, ok := s["properties"]; ok {
			return fmt.Errorf("%s: properties and an additionalProperties schema together: a CRD allows one of them", path)
		}
		if out["additionalProperties"], err = c.convert(ap, path+".*", inList); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%s: additionalProperties is %T", path, ap)
	}
	return nil
}

// items converts s's items into out; below them `required` holds.
func (c converter) items(s, out map[string]any, path string) error {
	it, ok := s["items"]
	if !ok {
		return nil
	}
	m, ok := it.(map[string]any)
	if !ok {
		return fmt.Errorf("%s: items must be one schema (tuples are not structural)", path)
	}
	var err error
	if out["items"], err = c.convert(m, path+"[]", true); err != nil {
		return err
	}
	if out["x-kubernetes-list-type"] == "set" {
		if it := out["items"].(map[string]any)["type"]; it == "object" || it == "array" || it == nil {
			return fmt.Errorf("%s: uniqueItems on a list of %v: a CRD list set holds scalars only", path, it)
		}
	}
	return nil
}

// resolve inlines a $ref to the root's definitions (a CRD has no $ref);
// keywords beside the $ref (a description) win over the definition's.
func (c converter) resolve(s map[string]any, path string) (map[string]any, error) {
	ref, ok := s["$ref"].(string)
	if !ok {
		if _, has := s["$ref"]; has {
			return nil, fmt.Errorf("%s: $ref is not a string", path)
		}
		return s, nil
	}
	name, ok := strings.CutPrefix(ref, "#/definitions/")
	def, _ := c.defs[name].(map[string]any)
	if !ok || def == nil {
		return nil, fmt.Errorf("%s: $ref %q: only #/definitions/<name> of the same file", path, ref)
	}
	def, err := c.resolve(def, path)
	if err != nil {
		return nil, err
	}
	out := map[string]any{}
	for k, v := range def {
		out[k] = v
	}
	for k, v := range s {
		if k != "$ref" {
			out[k] = v
		}
	}
	return out, nil
}

// typeOf is the one type a structural schema needs: s's own, else the one
// its enum, const or anyOf/oneOf branches share. "int-or-string" and ""
// (any value) stand for what a CRD says with x-kubernetes-* instead.
func (c converter) typeOf(s map[string]any, path string) (string, error) {
	switch t := s["type"].(type) {
	case string:
		return t, nil
	case []any:
		set := map[string]bool{}
		for _, x := range t {
			set[fmt.Sprint(x)] = true
		}
		switch {
		case len(set) == 1:
			for k := range set {
				return k, nil
			}
		case len(set) == 2 && set["integer"] && set["string"]:
			return "int-or-string", nil
		case set["string"] && (set["integer"] || set["number"]) && !set["object"] && !set["array"]:
			// A quantity: 128Mi, 1 or 0.5. A CRD has int-or-string but no
			// number-or-string, and refusing 0.5 would refuse what the chart
			// takes.
			return "", nil
		}
		return "", fmt.Errorf("%s: type %v has no structural form", path, t)
	case nil:
	default:
		return "", fmt.Errorf("%s: type is %T", path, t)
	}
	var vals []any
	if e, ok := s["enum"].([]any); ok {
		vals = append(vals, e...)
	}
	if v, ok := s["const"]; ok {
		vals = append(vals, v)
	}
	found := map[string]bool{}
	for _, v := range vals {
		found[jsonType(v)] = true
	}
	for _, j := range []string{"anyOf", "oneOf"} {
		bs, _ := s[j].([]any)
		for i, b := range bs {
			m, _ := b.(map[string]any)
			m, err := c.resolve(m, fmt.Sprintf("%s.%s[%d]", path, j, i))
			if err != nil {
				return "", err
			}
			t, err := c.typeOf(m, fmt.Sprintf("%s.%s[%d]", path, j, i))
			if err != nil {
				return "", err
			}
			found[t] = true
		}
	}
	if len(found) == 1 {
		for k := range found {
			if k != "" {
				return k, nil
			}
		}
	}
	return "", fmt.Errorf("%s: no type, and none to infer (found %v): give it a type", path, sortedKeys(found))
}

// branches converts anyOf/oneOf branches into value checks: a structural
// schema names the type outside them and lets branches say nothing else.
func (c converter) branches(v any, typ, path string, inList bool) ([]any, error) {
	bs, ok := v.([]any)
	if !ok || len(bs) == 0 {
		return nil, fmt.Errorf("%s: must be a list of schemas", path)
	}
	var out []any
	for i, b := range bs {
		m, _ := b.(map[string]any)
		p := fmt.Sprintf("%s[%d]", path, i)
		m, err := c.resolve(m, p)
		if err != nil {
			return nil, err
		}
		for _, k := range []string{"properties", "items", "additionalProperties", "anyOf", "oneOf"} {
			if _, ok := m[k]; ok {
				return nil, fmt.Errorf("%s: %s inside a branch: only value checks (pattern, enum, bounds) can be expressed there", p, k)
			}
		}
		bt, err := c.typeOf(m, p)
		if err != nil {
			return nil, err
		}
		if bt != typ {
			return nil, fmt.Errorf("%s: a branch of type %s under type %s: a CRD names one type outside the branches", p, bt, typ)
		}
		conv := map[string]any{}
		for _, k := range sortedKeys(m) {
			switch {
			case k == "type", k == "description", dropped[k]:
			case k == "const":
				conv["enum"] = []any{m[k]}
			case contains(copied, k):
				conv[k] = m[k]
			default:
				return nil, fmt.Errorf("%s: %q inside a branch cannot be expressed in a CRD", p, k)
			}
		}
		out = append(out, conv)
	}
	return out, nil
}

// bounded refuses a string without maxLength (or enum), a list without
// maxItems and a map without maxProperties: the CRD bounds what a spec
// may hold, and the API server's cost estimate of any validation rule on
// a field needs its bounds.
func bounded(s map[string]any, typ, path string) error {
	has := func(k string) bool { _, ok := s[k]; return ok }
	switch {
	case typ == "string" && !has("maxLength") && !has("enum"):
		return fmt.Errorf("%s: a string without maxLength (or enum): bound it in values.schema.json", path)
	case typ == "array" && !has("maxItems"):
		return fmt.Errorf("%s: a list without maxItems: bound it in values.schema.json", path)
	case typ == "object" && has("additionalProperties") && !has("maxProperties"):
		return fmt.Errorf("%s: a map without maxProperties: bound it in values.schema.json", path)
	case (typ == "int-or-string" || typ == "") && !has("maxLength"):
		return fmt.Errorf("%s: a value that may be a string, without maxLength: bound it in values.schema.json", path)
	}
	return nil
}

func jsonType(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case bool:
		return "boolean"
	case float64:
		return "number"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	}
	return ""
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
