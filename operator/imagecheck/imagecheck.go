// Package imagecheck finds every container image in rendered manifests
// and says which escape an image mirror: the proof that with imageMirror
// set nothing is pulled from anywhere else.
package imagecheck

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
)

// Image is one container image and where it was found.
type Image struct {
	Ref   string // as written
	Where string // "DaemonSet spegel/spegel: initContainers[0]"
}

// containerLists are the pod spec fields that hold containers, at any
// depth (Pod, Deployment, DaemonSet, Job, CronJob templates).
var containerLists = map[string]bool{"containers": true, "initContainers": true, "ephemeralContainers": true}

// Images returns every container image of the multi-document YAML.
func Images(manifests string) ([]Image, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifests), 4096)
	var out []Image
	for {
		var obj map[string]any
		if err := dec.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, fmt.Errorf("reading manifests: %w", err)
		}
		if len(obj) == 0 {
			continue
		}
		md, _ := obj["metadata"].(map[string]any)
		name := fmt.Sprintf("%v %v/%v", obj["kind"], md["namespace"], md["name"])
		walk(obj, name, &out)
	}
	return out, nil
}

func walk(v any, name string, out *[]Image) {
	switch t := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(t))
		for k := range t {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if list, ok := t[k].([]any); ok && containerLists[k] {
				for i, c := range list {
					if m, ok := c.(map[string]any); ok {
						ref, _ := m["image"].(string)
						*out = append(*out, Image{Ref: ref, Where: fmt.Sprintf("%s: %s[%d]", name, k, i)})
					}
				}
				continue
			}
			walk(t[k], name, out)
		}
	case []any:
		for _, e := range t {
			walk(e, name, out)
		}
	}
}

// Escapes returns a line for each image of manifests that is not under
// mirror ("host[:port][/prefix]"), does not parse, or is on a legacy
// registry path; none means every image comes from the mirror.
func Escapes(mirror, manifests string) ([]string, error) {
	m, err := imageref.ParseMirror(mirror)
	if err != nil {
		return nil, err
	}
	imgs, err := Images(manifests)
	if err != nil {
		return nil, err
	}
	var bad []string
	for _, img := range imgs {
		r, err := imageref.Parse(img.Ref)
		switch {
		case err != nil:
			bad = append(bad, fmt.Sprintf("%s: %v", img.Where, err))
		case !m.Contains(r):
			bad = append(bad, fmt.Sprintf("%s: image %s is not under the mirror %s", img.Where, img.Ref, m))
		case imageref.IsLegacy(r):
			bad = append(bad, fmt.Sprintf("%s: image %s is on a legacy registry path", img.Where, img.Ref))
		}
	}
	return bad, nil
}
