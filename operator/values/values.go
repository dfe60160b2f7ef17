// Package values turns a Spegel resource's spec into the values of the
// helm-charts/spegel chart. Spec fields are named like the chart's values,
// so the spec is copied as it is, over the provider override's values;
// what the operator adds are the images (defaults from the images map and
// the imageMirror rewrite) and the name of the network key Secret it made
// for the resource.
//
// Precedence, lowest first: the chart's values.yaml < the provider
// override (Inputs.Defaults) < the resource's spec < watches.yaml's
// overrideValues (Inputs.Overrides) < the images map,
// which fills only the images the spec leaves out; imageMirror then
// rewrites every image, given or filled.
package values

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"helm.sh/helm/v3/pkg/strvals"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
)

// Image keys of the images map.
const (
	AgentImage    = "agent"
	OperatorImage = "operator"
)

// Inputs are what the operator adds to every resource's spec.
type Inputs struct {
	// Images maps AgentImage and OperatorImage to full references
	// (ghcr.io/fleetmirror/agent:v0.1.0).
	Images map[string]string
	// Mirror is imageMirror, "host[:port][/prefix]": every image rendered
	// is pulled from there. Empty: images are pulled as named.
	Mirror string
	// Defaults are the provider override's values (overrides/<provider>.yaml),
	// spec-shaped; every resource's spec is merged over them.
	Defaults map[string]any
	// Overrides are watches.yaml's overrideValues ("image.tag": "v1", as
	// `helm --set` reads them), set over every spec as helm-operator does.
	Overrides map[string]string
}

// Validate says what is missing from the inputs.
func (in Inputs) Validate() error {
	for _, k := range []string{AgentImage, OperatorImage} {
		if in.Images[k] == "" {
			return fmt.Errorf("images map: no %q image; set images.%s", k, k)
		}
		if _, err := imageref.Parse(in.Images[k]); err != nil {
			return fmt.Errorf("images map: images.%s: %w", k, err)
		}
	}
	if in.Mirror != "" {
		if _, err := imageref.ParseMirror(in.Mirror); err != nil {
			return fmt.Errorf("imageMirror: %w", err)
		}
	}
	// An image comes from the spec or the images map: one the override
	// named would beat the images map, against the documented precedence.
	for _, path := range ImageValues {
		if _, ok, _ := unstructured.NestedFieldNoCopy(in.Defaults, path...); ok {
			return fmt.Errorf("provider.spegel.%s: provider overrides never name images; set the images map (or the Spegel resource's spec)", strings.Join(path, "."))
		}
	}
	return nil
}

// ImageValues are the chart's values that name images: the spec's, else
// the images map's (or, for containerdPrep.image, the agent's).
var ImageValues = [][]string{{"image"}, {"containerdPrep", "image"}, {"cleanup", "waitImage"}}

// Translate returns the chart values for spec (the resource's .spec, as
// decoded JSON). keySecret names the network key Secret the operator made
// for the resource, used unless the spec names one of its own; so the
// values are a function of the spec and that name alone, and a reconcile
// without a change renders the same release. Errors name the spec field
// that is wrong.
func Translate(spec map[string]any, keySecret string, in Inputs) (map[string]any, error) {
	if err := in.Validate(); err != nil {
		return nil, err
	}
	vals, err := Effective(in.Defaults, spec, in.Overrides)
	if err != nil {
		return nil, err
	}

	nk, _ := vals["networkKey"].(map[string]any)
	if nk == nil {
		nk = map[string]any{}
	}
	if s, _ := nk["secretName"].(string); s == "" && keySecret != "" {
		nk["secretName"] = keySecret
	}
	vals["networkKey"] = nk

	if err := agentImage(vals, in); err != nil {
		return nil, err
	}
	if prep, ok := vals["containerdPrep"].(map[string]any); ok {
		if s, _ := prep["image"].(string); s != "" {
			r, err := place(s, in.Mirror, "spec.containerdPrep.image")
			if err != nil {
				return nil, err
			}
			prep["image"] = r.String()
		}
	}

	if err := waitImage(vals, in); err != nil {
		return nil, err
	}
	return vals, nil
}

// KeySecret is the network key Secret that values (from Translate) name;
// empty when the chart is to make its own.
func KeySecret(vals map[string]any) string {
	nk, _ := vals["networkKey"].(map[string]any)
	s, _ := nk["secretName"].(string)
	return s
}

// place parses ref and puts it under the mirror, if any.
func place(ref, mirror, field string) (imageref.Reference, error) {
	if mirror != "" {
		m, err := imageref.Mirror(mirror, ref)
		if err != nil {
			return imageref.Reference{}, fmt.Errorf("%s: %w", field, err)
		}
		ref = m
	}
	r, err := imageref.Parse(ref)
	if err != nil {
		return imageref.Reference{}, fmt.Errorf("%s: %w", field, err)
	}
	return r, nil
}

func joinRef(repo, tag string) string {
	if strings.HasPrefix(tag, "@") {
		return repo + tag
	}
	return repo + ":" + tag
}

// tagOf is the chart's image.tag: the tag, the digest, or both.
func tagOf(r imageref.Reference) string {
	switch {
	case r.Digest == "":
		return r.Tag
	case r.Tag == "":
		return "@" + r.Digest
	default:
		return r.Tag + "@" + r.Digest
	}
}

// Effective is what a resource asks of the chart before images are
// filled in: the provider override's values, the spec over them, and
// watches.yaml's overrideValues over both. The inputs are left as they are.
func Effective(defaults, spec map[string]any, overrides map[string]string) (map[string]any, error) {
	vals := Merge(defaults, spec)
	keys := make([]string, 0, len(overrides))
	for k := range overrides {
		keys = append(keys, k)
	}
	sort.Strings(keys) // a deeper key after its parent, whatever the map order
	for _, k := range keys {
		if err := strvals.ParseInto(k+"="+overrides[k], vals); err != nil {
			return nil, fmt.Errorf("watches.yaml overrideValues %q: %w", k, err)
		}
	}
	return vals, nil
}

// Merge returns over laid on base, both left as they are: maps merge key
// by key, anything else in over (lists included) replaces base's value.
func Merge(base, over map[string]any) map[string]any {
	out := map[string]any{}
	if base != nil {
		out = runtime.DeepCopyJSON(base)
	}
	for k, v := range over {
		bm, bok := out[k].(map[string]any)
		om, ook := v.(map[string]any)
		if bok && ook {
			out[k] = Merge(bm, om)
			continue
		}
		out[k] = runtime.DeepCopyJSONValue(v)
	}
	return out
}

// agentImage sets vals' agent image: the spec's (its tag defaulting to
// the operator's agent), else the images map's; placed under the mirror.
func agentImage(vals map[string]any, in Inputs) error {
	img, _ := vals["image"].(map[string]any)
	if img == nil {
		img = map[string]any{}
	}
	repo, _ := img["repository"].(string)
	tag, _ := img["tag"].(string)
	ref := in.Images[AgentImage]
	field := "images." + AgentImage
	if repo != "" {
		field = "spec.image"
		if tag == "" {
			// The agent of the operator's own release.
			def, _ := imageref.Parse(in.Images[AgentImage])
			tag = def.Tag
		}
		ref = joinRef(repo, tag)
	} else if tag != "" {
		return errors.New("spec.image.tag is set without spec.image.repository: set both, or neither to use the operator's agent image")
	}
	r, err := place(ref, in.Mirror, field)
	if err != nil {
		return err
	}
	img["repository"] = r.Name()
	img["tag"] = tagOf(r)
	vals["image"] = img
	return nil
}

// waitImage sets the wait hook's image: the spec's, else the operator's
// own from the images map (the chart's default, empty, would be the
// operator of the chart's appVersion, which an air-gapped cluster may not
// have).
func waitImage(vals map[string]any, in Inputs) error {
	cleanup, _ := vals["cleanup"].(map[string]any)
	if cleanup == nil {
		cleanup = map[string]any{}
	}
	wait, field := in.Images[OperatorImage], "images."+OperatorImage
	if s, _ := cleanup["waitImage"].(string); s != "" {
		wait, field = s, "spec.cleanup.waitImage"
	}
	w, err := place(wait, in.Mirror, field)
	if err != nil {
		return err
	}
	cleanup["waitImage"] = w.String()
	vals["cleanup"] = cleanup
	return nil
}
