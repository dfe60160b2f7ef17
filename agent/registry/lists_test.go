package registry

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/peerproto"
)

// TestAnswersIndependentClients covers what skopeo, crane and the
// conformance suite ask, which containerd never does: tags without ns,
// lists, referrers, and malformed references.
func TestAnswersIndependentClients(t *testing.T) {
	nodes := newNodes(t, 2, nil)
	nd := nodes[0]
	manifest := []byte(`{"schemaVersion":2,"mediaType":"` + ocispec.MediaTypeImageManifest + `"}`)
	md := nd.hold(t, ocispec.MediaTypeImageManifest, manifest, "docker.io/team/app:v1", "docker.io/team/app:v2", "ghcr.io/team/app:v2")
	list := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}`)
	ld := nd.hold(t, "application/vnd.docker.distribution.manifest.list.v2+json", list, "ghcr.io/team/app:v3", "ghcr.io/other:v1")
	layer := randomBytes(t, 4096)
	layerD := nd.hold(t, ocispec.MediaTypeImageLayer, layer)
	config := []byte(`{"architecture":"amd64"}`)
	configD := nd.hold(t, ocispec.MediaTypeImageConfig, config)
	// Only a peer holds this tag: without ns it must not be fetched.
	nodes[1].hold(t, ocispec.MediaTypeImageManifest, []byte(`{"schemaVersion":2,"peer":1}`), "docker.io/team/app:peer")
	base := nd.srv.URL
	sha512 := "sha512:" + strings.Repeat("ab", 64)

	tests := []struct {
		name, method, path string
		status             int
		code               string   // the error code, for errors
		message            []string // what the error message must say
		body               []byte
		tags               []string // the tags/list answer
		headers            map[string]string
	}{
		{name: "tag without ns, one registry", method: "GET", path: "/v2/team/app/manifests/v1", status: 200, body: manifest,
			headers: map[string]string{"Docker-Content-Digest": md.String(), "Content-Type": ocispec.MediaTypeImageManifest, peerproto.SourceHeader: "local"}},
		{name: "manifest list by tag without ns", method: "HEAD", path: "/v2/team/app/manifests/v3", status: 200,
			headers: map[string]string{"Docker-Content-Digest": ld.String(), "Content-Type": "application/vnd.docker.distribution.manifest.list.v2+json",
				"Content-Length": fmt.Sprint(len(list))}},
		{name: "tag without ns, several registries", method: "GET", path: "/v2/team/app/manifests/v2", status: 404, code: "MANIFEST_UNKNOWN",
			message: []string{"team/app:v2", "docker.io, ghcr.io", "?ns="}},
		{name: "tag with ns picks one", method: "GET", path: "/v2/team/app/manifests/v2?ns=ghcr.io", status: 200, body: manifest},
		{name: "tag without ns, not on this node", method: "GET", path: "/v2/team/app/manifests/v9", status: 404, code: "MANIFEST_UNKNOWN",
			message: []string{"team/app:v9", "not on this node", "ns"}},
		{name: "tag without ns only a peer holds: peers not asked", method: "GET", path: "/v2/team/app/manifests/peer", status: 404,
			code: "MANIFEST_UNKNOWN", message: []string{"other nodes were not asked"}},
		{name: "tag of another repository without ns", method: "GET", path: "/v2/team/other/manifests/v1", status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "layer as manifest", method: "GET", path: "/v2/team/app/manifests/" + layerD.String(), status: 404, code: "MANIFEST_UNKNOWN",
			message: []string{"not a manifest", "/blobs/"}},
		{name: "config as manifest", method: "HEAD", path: "/v2/team/app/manifests/" + configD.String(), status: 404},
		{name: "layer as manifest with ns", method: "GET", path: "/v2/team/app/manifests/" + layerD.String() + "?ns=docker.io", status: 404,
			code: "MANIFEST_UNKNOWN"},
		{name: "layer as blob", method: "GET", path: "/v2/team/app/blobs/" + layerD.String(), status: 200, body: layer},
		{name: "manifest as blob", method: "GET", path: "/v2/team/app/blobs/" + md.String(), status: 200, body: manifest,
			headers: map[string]string{"Content-Type": "application/octet-stream"}},
		{name: "sha512 manifest", method: "GET", path: "/v2/team/app/manifests/" + sha512, status: 400, code: "DIGEST_INVALID"},
		{name: "sha512 blob", method: "GET", path: "/v2/team/app/blobs/" + sha512, status: 400, code: "DIGEST_INVALID"},
		{name: "malformed digest", method: "GET", path: "/v2/team/app/manifests/sha256:baddigeststring", status: 400, code: "DIGEST_INVALID"},
		{name: "blob by tag", method: "GET", path: "/v2/team/app/blobs/v1", status: 400, code: "DIGEST_INVALID"},
		{name: "malformed tag", method: "GET", path: "/v2/team/app/manifests/-v1", status: 404, code: "MANIFEST_UNKNOWN", message: []string{"tag"}},
		{name: "bad name", method: "GET", path: "/v2/Team/app/manifests/v1", status: 400, code: "NAME_INVALID"},
		{name: "bad ns", method: "GET", path: "/v2/team/app/manifests/v1?ns=a/b", status: 400, code: "NAME_INVALID"},
		{name: "unknown blob", method: "GET", path: "/v2/team/app/blobs/" + digest.FromString("none").String(), status: 404, code: "BLOB_UNKNOWN"},
		{name: "unknown endpoint", method: "GET", path: "/v2/team/app/uploads/x", status: 404, code: "UNSUPPORTED"},

		{name: "tags of any registry", method: "GET", path: "/v2/team/app/tags/list", status: 200, tags: []string{"v1", "v2", "v3"},
			headers: map[string]string{"Content-Type": "application/json", "Link": ""}},
		{name: "tags of one registry", method: "GET", path: "/v2/team/app/tags/list?ns=ghcr.io", status: 200, tags: []string{"v2", "v3"}},
		{name: "tags, first page", method: "GET", path: "/v2/team/app/tags/list?n=2", status: 200, tags: []string{"v1", "v2"},
			headers: map[string]string{"Link": `</v2/team/app/tags/list?last=v2&n=2>; rel="next"`}},
		{name: "tags, next page", method: "GET", path: "/v2/team/app/tags/list?n=2&last=v2", status: 200, tags: []string{"v3"},
			headers: map[string]string{"Link": ""}},
		{name: "tags, page of one registry", method: "GET", path: "/v2/team/app/tags/list?n=1&ns=ghcr.io", status: 200, tags: []string{"v2"},
			headers: map[string]string{"Link": `</v2/team/app/tags/list?last=v2&n=1&ns=ghcr.io>; rel="next"`}},
		{name: "tags after last only", method: "GET", path: "/v2/team/app/tags/list?last=v1", status: 200, tags: []string{"v2", "v3"}},
		{name: "tags, n=0", method: "GET", path: "/v2/team/app/tags/list?n=0", status: 200, tags: []string{}},
		{name: "tags, n too large", method: "GET", path: "/v2/team/app/tags/list?n=100", status: 200, tags: []string{"v1", "v2", "v3"}},
		{name: "tags of a name with none here", method: "GET", path: "/v2/team/none/tags/list", status: 200, tags: []string{}},
		{name: "tags of a single-component name", method: "GET", path: "/v2/other/tags/list", status: 200, tags: []string{"v1"}},
		{name: "tags head", method: "HEAD", path: "/v2/team/app/tags/list", status: 200, headers: map[string]string{"Content-Type": "application/json"}},
		{name: "tags, bad n", method: "GET", path: "/v2/team/app/tags/list?n=-1", status: 400, code: "UNSUPPORTED"},
		{name: "tags, bad name", method: "GET", path: "/v2/Team/tags/list", status: 400, code: "NAME_INVALID"},
		{name: "catalog", method: "GET", path: "/v2/_catalog", status: 404, code: "UNSUPPORTED", message: []string{"tags/list"}},
		{name: "referrers", method: "GET", path: "/v2/team/app/referrers/" + md.String(), status: 404, code: "UNSUPPORTED",
			message: []string{"sha256-" + md.Encoded()}},
		{name: "referrers, bad digest", method: "GET", path: "/v2/team/app/referrers/" + sha512, status: 400, code: "DIGEST_INVALID"},
		{name: "push to tags refused", method: "DELETE", path: "/v2/team/app/manifests/v1", status: 405, code: "UNSUPPORTED"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := get(t, tt.method, base+tt.path)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.status, body)
			}
			if tt.body != nil && !bytes.Equal(body, tt.body) {
				t.Fatalf("body %q, want %q", body, tt.body)
			}
			for k, v := range tt.headers {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if tt.tags != nil {
				var l struct {
					Name string
					Tags []string
				}
				if err := json.Unmarshal(body, &l); err != nil || l.Tags == nil {
					t.Fatalf("not a tag list: %s", body)
				}
				if want := strings.TrimPrefix(strings.Split(tt.path, "/tags/")[0], "/v2/"); l.Name != want {
					t.Errorf("name %q, want %q", l.Name, want)
				}
				if fmt.Sprint(l.Tags) != fmt.Sprint(tt.tags) {
					t.Errorf("tags %v, want %v", l.Tags, tt.tags)
				}
			}
			if tt.code == "" || tt.method == "HEAD" {
				return
			}
			var e struct {
				Errors []struct{ Code, Message string }
			}
			if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 {
				t.Fatalf("not an OCI error body: %s", body)
			}
			if e.Errors[0].Code != tt.code {
				t.Errorf("code %s, want %s: %s", e.Errors[0].Code, tt.code, e.Errors[0].Message)
			}
			for _, m := range tt.message {
				if !strings.Contains(e.Errors[0].Message, m) {
					t.Errorf("message %q lacks %q", e.Errors[0].Message, m)
				}
			}
		})
	}
	// A tag without ns served locally counts under registry "unknown":
	// the client named none.
	if got := testutil.ToFloat64(nd.metrics.Requests.WithLabelValues("unknown", "manifest", metrics.OutcomeLocal)); got < 2 {
		t.Errorf("local manifest requests without ns = %v, want at least 2", got)
	}
	if got := testutil.ToFloat64(nodes[1].metrics.ServedToPeers); got != 0 {
		t.Errorf("a peer served %v bytes for requests that must never reach peers", got)
	}
}
