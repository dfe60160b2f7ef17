package values

import (
	"reflect"
	"strings"
	"testing"
)

var images = map[string]string{AgentImage: "ghcr.io/fleetmirror/agent:v0.1.0", OperatorImage: "ghcr.io/fleetmirror/operator:v0.1.0"}

func TestTranslate(t *testing.T) {
	for _, tc := range []struct {
		name      string
		spec      map[string]any
		mirror    string
		keySecret string
		want      map[string]any // checked keys only
		wantErr   string
	}{
		{name: "defaults from the images map", spec: nil, want: map[string]any{
			"image":   map[string]any{"repository": "ghcr.io/fleetmirror/agent", "tag": "v0.1.0"},
			"cleanup": map[string]any{"waitImage": "ghcr.io/fleetmirror/operator:v0.1.0"},
		}},
		{name: "spec image with tag", spec: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent", "tag": "v9", "pullPolicy": "Always"}},
			want: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent", "tag": "v9", "pullPolicy": "Always"}}},
		{name: "spec repository without tag takes the operator's agent tag", spec: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent"}},
			want: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent", "tag": "v0.1.0"}}},
		{name: "digest", spec: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent", "tag": "@sha256:" + strings.Repeat("a", 64)}},
			want: map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent", "tag": "@sha256:" + strings.Repeat("a", 64)}}},
		{name: "mirror rewrites every image", mirror: "registry.corp:5000/mirror",
			spec: map[string]any{"containerdPrep": map[string]any{"enabled": true, "image": "ghcr.io/fleetmirror/agent:v0.1.0"}},
			want: map[string]any{
				"image":          map[string]any{"repository": "registry.corp:5000/mirror/ghcr.io/fleetmirror/agent", "tag": "v0.1.0"},
				"containerdPrep": map[string]any{"enabled": true, "image": "registry.corp:5000/mirror/ghcr.io/fleetmirror/agent:v0.1.0"},
				"cleanup":        map[string]any{"waitImage": "registry.corp:5000/mirror/ghcr.io/fleetmirror/operator:v0.1.0"},
			}},
		{name: "other fields pass through", spec: map[string]any{"mirroredRegistries": []any{"https://docker.io"}, "logLevel": "debug"},
			want: map[string]any{"mirroredRegistries": []any{"https://docker.io"}, "logLevel": "debug"}},
		{name: "the operator's network key Secret", keySecret: "spegel-operator-network-key",
			want: map[string]any{"networkKey": map[string]any{"secretName": "spegel-operator-network-key"}}},
		{name: "a Secret the spec names wins over the operator's", keySecret: "spegel-operator-network-key",
			spec: map[string]any{"networkKey": map[string]any{"secretName": "mine"}},
			want: map[string]any{"networkKey": map[string]any{"secretName": "mine"}}},
		{name: "no Secret: the chart makes its own",
			want: map[string]any{"networkKey": map[string]any{}}},
		{name: "tag without repository", spec: map[string]any{"image": map[string]any{"tag": "v1"}}, wantErr: "spec.image.tag is set without spec.image.repository"},
		{name: "bad prep image", spec: map[string]any{"containerdPrep": map[string]any{"image": "Bad Image"}}, wantErr: "spec.containerdPrep.image"},
		{name: "bad mirror", mirror: "https://registry.corp", wantErr: "imageMirror"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Translate(tc.spec, tc.keySecret, Inputs{Images: images, Mirror: tc.mirror})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.want {
				if !reflect.DeepEqual(got[k], v) {
					t.Errorf("%s = %#v, want %#v", k, got[k], v)
				}
			}
		})
	}
}

func TestTranslateDoesNotChangeSpec(t *testing.T) {
	spec := map[string]any{"image": map[string]any{"repository": "registry.corp/fm/agent"}}
	if _, err := Translate(spec, "", Inputs{Images: images, Mirror: "m.corp"}); err != nil {
		t.Fatal(err)
	}
	if got := spec["image"].(map[string]any); len(got) != 1 {
		t.Fatalf("spec was changed: %v", got)
	}
}

func TestInputsValidate(t *testing.T) {
	if err := (Inputs{Images: map[string]string{AgentImage: "ghcr.io/fleetmirror/agent:v1"}}).Validate(); err == nil || !strings.Contains(err.Error(), `"operator"`) {
		t.Fatalf("missing operator image: %v", err)
	}
}

// TestPrecedence: chart defaults < provider override < spec < images map
// for images the spec leaves out; imageMirror rewrites all of them.
func TestPrecedence(t *testing.T) {
	defaults := map[string]any{
		"containerdPrep": map[string]any{"enabled": true, "unit": "containerd.service"},
		"resources":      map[string]any{"requests": map[string]any{"memory": "128Mi"}, "limits": map[string]any{"memory": "256Mi"}},
		"tolerations":    []any{map[string]any{"operator": "Exists"}},
		"logLevel":       "warn",
	}
	spec := map[string]any{
		"containerdPrep": map[string]any{"enabled": false},
		"resources":      map[string]any{"limits": map[string]any{"memory": "512Mi"}},
		"tolerations":    []any{map[string]any{"key": "a", "operator": "Exists"}},
	}
	got, err := Translate(spec, "", Inputs{Images: images, Defaults: defaults, Mirror: "m.corp"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		// the spec wins key by key inside maps...
		"containerdPrep": map[string]any{"enabled": false, "unit": "containerd.service"},
		"resources":      map[string]any{"requests": map[string]any{"memory": "128Mi"}, "limits": map[string]any{"memory": "512Mi"}},
		// ...and replaces lists whole
		"tolerations": []any{map[string]any{"key": "a", "operator": "Exists"}},
		// the override fills what the spec leaves out
		"logLevel": "warn",
		// the images map fills the image, under the mirror
		"image": map[string]any{"repository": "m.corp/ghcr.io/fleetmirror/agent", "tag": "v0.1.0"},
	}
	for k, v := range want {
		if !reflect.DeepEqual(got[k], v) {
			t.Errorf("%s = %#v, want %#v", k, got[k], v)
		}
	}
	if defaults["logLevel"] != "warn" || len(defaults["containerdPrep"].(map[string]any)) != 2 || spec["image"] != nil {
		t.Error("Translate changed its inputs")
	}
	// An image in the spec wins over the map, and is still mirrored.
	got, err = Translate(map[string]any{"image": map[string]any{"repository": "registry.corp/agent", "tag": "v2"}}, "", Inputs{Images: images, Defaults: defaults, Mirror: "m.corp"})
	if err != nil {
		t.Fatal(err)
	}
	if img := got["image"].(map[string]any); img["repository"] != "m.corp/registry.corp/agent" || img["tag"] != "v2" {
		t.Errorf("spec image: %v", img)
	}
}
