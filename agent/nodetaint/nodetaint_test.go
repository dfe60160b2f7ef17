package nodetaint

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAPI serves one node as the API server does, applying the JSON patch
// ops the releaser sends.
type fakeAPI struct {
	mu      sync.Mutex
	created time.Time
	taints  []map[string]any
	annots  map[string]any
	patches []string
	auth    string
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.auth = r.Header.Get("Authorization")
	if r.URL.Path != "/api/v1/nodes/n1" {
		http.NotFound(w, r)
		return
	}
	switch r.Method {
	case http.MethodGet:
		json.NewEncoder(w).Encode(map[string]any{"metadata": map[string]any{"resourceVersion": "7", "creationTimestamp": f.created.Format(time.RFC3339), "annotations": f.annots},
			"spec": map[string]any{"taints": f.taints}})
	case http.MethodPatch:
		b, _ := io.ReadAll(r.Body)
		f.patches = append(f.patches, string(b))
		var ops []map[string]any
		json.Unmarshal(b, &ops)
		for _, op := range ops {
			switch op["op"] {
			case "replace":
				f.taints = nil
				for _, t := range op["value"].([]any) {
					f.taints = append(f.taints, t.(map[string]any))
				}
			case "remove":
				f.taints = nil
			case "add":
				switch path := op["path"].(string); {
				case path == "/metadata/annotations":
					f.annots = op["value"].(map[string]any)
				case strings.HasPrefix(path, "/metadata/annotations/"):
					if f.annots == nil {
						http.Error(w, "add to a missing parent", http.StatusUnprocessableEntity)
						return
					}
					f.annots[strings.ReplaceAll(strings.TrimPrefix(path, "/metadata/annotations/"), "~1", "/")] = op["value"]
				}
			}
		}
		w.Write([]byte("{}"))
	}
}

func TestCheck(t *testing.T) {
	api := &fakeAPI{created: time.Now().Add(-time.Minute), taints: []map[string]any{
		{"key": "example.com/gpu", "value": "true", "effect": "NoSchedule"}, {"key": TaintKey, "effect": "NoSchedule"}}}
	srv := httptest.NewTLSServer(api)
	defer srv.Close()
	dir := t.TempDir()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o600)
	os.WriteFile(filepath.Join(dir, "token"), []byte("tok\n"), 0o600)
	r := func(after time.Duration) *Releaser {
		rel, err := New("n1", after, srv.URL+"/", filepath.Join(dir, "token"), filepath.Join(dir, "ca.crt"), WithLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		return rel
	}
	// Before the bound: nothing written, the rest of the bound to wait.
	wait, err := r(time.Hour).Check(context.Background())
	if err != nil || wait < 58*time.Minute || len(api.patches) != 0 {
		t.Fatalf("before the bound: wait %s, err %v, patches %v", wait, err, api.patches)
	}
	// Past it: only the startup taint goes, if nothing changed meanwhile.
	wait, err = r(30 * time.Second).Check(context.Background())
	if err != nil || wait != 0 || len(api.patches) != 1 {
		t.Fatalf("past the bound: wait %s, err %v, patches %v", wait, err, api.patches)
	}
	if p := api.patches[0]; !strings.Contains(p, `"op":"test","path":"/metadata/resourceVersion","value":"7"`) || strings.Contains(p, TaintKey) {
		t.Errorf("patch %s", p)
	}
	if len(api.taints) != 1 || api.taints[0]["key"] != "example.com/gpu" || api.auth != "Bearer tok" {
		t.Errorf("taints %v, auth %q", api.taints, api.auth)
	}
	// It says why on the node, whether or not it had annotations.
	if why, _ := api.annots[ReleasedAnnotation].(string); !strings.Contains(why, "released by its agent") || !strings.Contains(why, "past the bound of 30s") {
		t.Errorf("annotations %v", api.annots)
	}
	api.taints, api.annots = append(api.taints, map[string]any{"key": TaintKey, "effect": "NoSchedule"}), map[string]any{"other": "x"}
	if _, err := r(30 * time.Second).Check(context.Background()); err != nil || api.annots["other"] != "x" || api.annots[ReleasedAnnotation] == nil {
		t.Errorf("with other annotations: err %v, annotations %v", err, api.annots)
	}
	api.patches = api.patches[:1]
	// Untainted past the bound: done, nothing written.
	if wait, err := r(30 * time.Second).Check(context.Background()); err != nil || wait != 0 || len(api.patches) != 1 {
		t.Errorf("untainted: wait %s, err %v, patches %d", wait, err, len(api.patches))
	}
	if _, err := New("n1", 0, "", "", ""); err == nil {
		t.Error("a Releaser without a bound or API server was made")
	}
}
