package crd

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/yaml"
)

const repoRoot = "../.."

func generated(t *testing.T) []byte {
	t.Helper()
	src, err := os.ReadFile(filepath.Join(repoRoot, ChartSchema))
	if err != nil {
		t.Fatal(err)
	}
	out, err := Generate(src)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestCheckedIn: both CRD copies are what the chart's schema generates.
func TestCheckedIn(t *testing.T) {
	want := generated(t)
	for _, f := range Files {
		got, err := os.ReadFile(filepath.Join(repoRoot, f))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s is not what %s generates from %s (%v): run %s and commit the result", f, Command, ChartSchema, err, Command)
		}
	}
}

// TestValid: the generated schema is structural, as the API server's own
// check has it (the whole CRD, rules and list types included, is installed
// on a real API server by test/operator), and its spec holds no default
// and no uniqueItems at any depth.
func TestValid(t *testing.T) {
	var v1 apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(generated(t), &v1); err != nil {
		t.Fatal(err)
	}
	var in apiextensions.CustomResourceDefinition
	if err := apiextensionsv1.Convert_v1_CustomResourceDefinition_To_apiextensions_CustomResourceDefinition(&v1, &in, nil); err != nil {
		t.Fatal(err)
	}
	if in.Spec.Validation == nil || in.Spec.Validation.OpenAPIV3Schema == nil {
		t.Fatal("no schema after conversion")
	}
	s, err := structuralschema.NewStructural(in.Spec.Validation.OpenAPIV3Schema)
	if err != nil {
		t.Fatalf("not structural: %v", err)
	}
	if errs := structuralschema.ValidateStructural(field.NewPath("openAPIV3Schema"), s); len(errs) > 0 {
		t.Fatalf("the API server would refuse the CRD: %v", errs.ToAggregate())
	}
	spec := v1.Spec.Versions[0].Schema.OpenAPIV3Schema.Properties["spec"]
	b, _ := json.Marshal(spec)
	for _, k := range []string{`"default"`, `"uniqueItems"`, `"$ref"`} {
		if bytes.Contains(b, []byte(k+":")) {
			t.Errorf("the spec schema holds %s", k)
		}
	}
	for _, k := range []string{"containerd", "ports", "mirrorTarget", "dataDir", "clusterDomain", "podLabels", "cleanup"} {
		if _, ok := spec.Properties[k]; !ok {
			t.Errorf("spec.%s is missing", k)
		}
	}
}

func TestConvert(t *testing.T) {
	str := map[string]any{"type": "string", "maxLength": 10.0}
	for _, tc := range []struct {
		name   string
		schema string
		want   string // JSON of the spec property "x"
		err    string
	}{
		{name: "default refused", schema: `{"x": {"type": "string", "maxLength": 3, "default": "a"}}`, err: ".x: default"},
		{name: "unbounded string", schema: `{"x": {"type": "string"}}`, err: ".x: a string without maxLength"},
		{name: "unbounded list", schema: `{"x": {"type": "array", "items": {"type": "boolean"}}}`, err: ".x: a list without maxItems"},
		{name: "unbounded map", schema: `{"x": {"type": "object", "additionalProperties": {"type": "boolean"}}}`, err: ".x: a map without maxProperties"},
		{name: "enum bounds a string, type inferred", schema: `{"x": {"enum": ["a", "b"]}}`, want: `{"enum":["a","b"],"type":"string"}`},
		{name: "uniqueItems is a set", schema: `{"x": {"type": "array", "maxItems": 2, "uniqueItems": true, "items": {"type": "integer"}}}`,
			want: `{"items":{"type":"integer"},"maxItems":2,"type":"array","x-kubernetes-list-type":"set"}`},
		{name: "uniqueItems of objects", schema: `{"x": {"type": "array", "maxItems": 2, "uniqueItems": true, "items": {"type": "object"}}}`, err: "list set holds scalars only"},
		{name: "closed object prunes", schema: `{"x": {"type": "object", "additionalProperties": false, "properties": {"a": {"type": "boolean"}}}}`,
			want: `{"properties":{"a":{"type":"boolean"}},"type":"object"}`},
		{name: "open object keeps unknown fields", schema: `{"x": {"type": "object", "properties": {"a": {"type": "boolean"}}}}`,
			want: `{"properties":{"a":{"type":"boolean"}},"type":"object","x-kubernetes-preserve-unknown-fields":true}`},
		{name: "required dropped over defaults, kept in lists", schema: `{"x": {"type": "object", "additionalProperties": false, "required": ["a"], "properties": {"a": {"type": "array", "maxItems": 1, "items": {"type": "object", "additionalProperties": false, "required": ["b"], "properties": {"b": {"type": "boolean"}}}}}}}`,
			want: `{"properties":{"a":{"items":{"properties":{"b":{"type":"boolean"}},"required":["b"],"type":"object"},"maxItems":1,"type":"array"}},"type":"object"}`},
		{name: "$ref inlined, description beside it wins", schema: `{"x": {"$ref": "#/definitions/s", "description": "mine"}}`,
			want: `{"description":"mine","maxLength":10,"type":"string"}`},
		{name: "anyOf keeps value checks, type outside", schema: `{"x": {"type": "string", "maxLength": 9, "anyOf": [{"const": ""}, {"$ref": "#/definitions/s", "pattern": "^a+$"}]}}`,
			want: `{"anyOf":[{"enum":[""]},{"maxLength":10,"pattern":"^a+$"}],"maxLength":9,"type":"string"}`},
		{name: "anyOf of two types", schema: `{"x": {"maxLength": 9, "anyOf": [{"type": "string"}, {"type": "boolean"}]}}`, err: "no type"},
		{name: "int or string", schema: `{"x": {"type": ["integer", "string"], "maxLength": 4}}`,
			want: `{"anyOf":[{"type":"integer"},{"type":"string"}],"maxLength":4,"x-kubernetes-int-or-string":true}`},
		{name: "quantity keeps any value", schema: `{"x": {"type": ["string", "integer", "number"], "maxLength": 4}}`,
			want: `{"maxLength":4,"x-kubernetes-preserve-unknown-fields":true}`},
		{name: "properties beside a map schema", schema: `{"x": {"type": "object", "maxProperties": 1, "properties": {"a": {"type": "boolean"}}, "additionalProperties": {"type": "boolean"}}}`, err: "a CRD allows one of them"},
		{name: "unsupported keyword", schema: `{"x": {"type": "object", "propertyNames": {"pattern": "^a$"}, "maxProperties": 1, "additionalProperties": {"type": "boolean"}}}`, err: `"propertyNames" cannot be expressed`},
		{name: "exclusive bounds", schema: `{"x": {"type": "integer", "exclusiveMinimum": 0}}`, want: `{"exclusiveMinimum":true,"minimum":0,"type":"integer"}`},
		{name: "global is Helm's", schema: `{"x": {"type": "boolean"}, "global": {"type": "object"}}`, want: `{"type":"boolean"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var props map[string]any
			if err := json.Unmarshal([]byte(tc.schema), &props); err != nil {
				t.Fatal(err)
			}
			got, err := SpecProperties(map[string]any{"properties": props, "definitions": map[string]any{"s": str}})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := got["global"]; ok {
				t.Error("global is in the spec")
			}
			b, _ := json.Marshal(got["x"])
			if string(b) != tc.want {
				t.Errorf("got  %s\nwant %s", b, tc.want)
			}
		})
	}
}

// TestTemplateNames: the constants clients use name what template.yaml
// defines.
func TestTemplateNames(t *testing.T) {
	var crd apiextensionsv1.CustomResourceDefinition
	if err := yaml.Unmarshal(template, &crd); err != nil {
		t.Fatal(err)
	}
	if crd.Spec.Group != Group || crd.Spec.Names.Plural != Plural || crd.Name != Plural+"."+Group {
		t.Errorf("template.yaml names %s (group %s, plural %s); the constants say %s.%s", crd.Name, crd.Spec.Group, crd.Spec.Names.Plural, Plural, Group)
	}
	var served bool
	for _, v := range crd.Spec.Versions {
		served = served || (v.Name == Version && v.Served)
	}
	if !served {
		t.Errorf("template.yaml serves no version %s", Version)
	}
}
