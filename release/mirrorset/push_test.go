package mirrorset

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/fleetmirror/fleetmirror/operator/imageref"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// testRegistry is go-containerregistry's registry on 127.0.0.1, optionally
// behind basic auth, counting what is written to it.
type testRegistry struct {
	*httptest.Server
	blobUploads  atomic.Int64 // POST .../blobs/uploads/
	manifestPuts atomic.Int64
	unauthorized atomic.Int64
}

func newRegistry(t *testing.T, user, pass string) *testRegistry {
	r := &testRegistry{}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if user != "" {
			u, p, ok := req.BasicAuth()
			if !ok || u != user || p != pass {
				r.unauthorized.Add(1)
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, "unauthorized", http.StatusUnauthorized)
				return
			}
		}
		switch {
		case req.Method == http.MethodPost && strings.HasSuffix(req.URL.Path, "/blobs/uploads/"):
			r.blobUploads.Add(1)
		case req.Method == http.MethodPut && strings.Contains(req.URL.Path, "/manifests/"):
			r.manifestPuts.Add(1)
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(r.Close)
	return r
}

func (r *testRegistry) host() string { return strings.TrimPrefix(r.URL, "http://") }

// useDockerConfig points the default keychain at a config.json that holds
// the credentials for host, the way `docker login` leaves them.
func useDockerConfig(t *testing.T, host, user, pass string) {
	dir := t.TempDir()
	cfg := map[string]any{"auths": map[string]any{host: map[string]string{
		"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + pass)),
	}}}
	data, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
}

func multiPlatform(t *testing.T) v1.ImageIndex {
	var idx v1.ImageIndex = empty.Index
	idx = mutate.IndexMediaType(idx, types.OCIImageIndex)
	for i, arch := range []string{"amd64", "arm64"} {
		img, err := random.Image(2048+int64(i), 2)
		if err != nil {
			t.Fatal(err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: "linux", Architecture: arch},
		}})
	}
	return idx
}

func writeDockerfile(t *testing.T, dir, name, content string) {
	if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name, "Dockerfile"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPushBetweenRegistries(t *testing.T) {
	ctx := context.Background()
	src := newRegistry(t, "", "")
	dst := newRegistry(t, "mirror", "s3cret")
	useDockerConfig(t, dst.host(), "mirror", "s3cret")

	idx := multiPlatform(t)
	idxRef := src.host() + "/team/multi:v1"
	if err := remote.WriteIndex(mustRef(t, idxRef), idx); err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(4096, 3)
	if err != nil {
		t.Fatal(err)
	}
	imgRef := src.host() + "/single:v2"
	if err := remote.Write(mustRef(t, imgRef), img); err != nil {
		t.Fatal(err)
	}
	idxDigest, _ := idx.Digest()
	imgDigest, _ := img.Digest()

	dir := t.TempDir()
	writeDockerfile(t, dir, "multi", fmt.Sprintf("FROM %s@%s\n", idxRef, idxDigest))
	writeDockerfile(t, dir, "single", fmt.Sprintf("FROM %s@%s\n", imgRef, imgDigest))
	writeDockerfile(t, dir, "broken", fmt.Sprintf("FROM %s/gone:v1@sha256:%s\n", src.host(), strings.Repeat("ab", 32)))
	set, findings, err := Load(dir)
	if err != nil || len(findings) != 0 {
		t.Fatalf("Load: %v %v", findings, err)
	}

	to := dst.host() + "/mirror/"
	opts := Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Jobs: 2}
	plan, err := Plan(ctx, set, to, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range plan {
		if st.Present || st.Err != nil {
			t.Errorf("plan before push: %s present=%v err=%v", st.Image.Name, st.Present, st.Err)
		}
		if want, _ := imageref.Mirror(to, st.Source); st.Target != want {
			t.Errorf("plan target %s, want imageref.Mirror's %s", st.Target, want)
		}
	}
	if dst.manifestPuts.Load() != 0 || dst.blobUploads.Load() != 0 {
		t.Fatalf("plan wrote to the target")
	}

	steps, err := Push(ctx, set, to, opts)
	if err == nil || !strings.Contains(err.Error(), "broken") || !strings.Contains(err.Error(), "1 of 3") {
		t.Fatalf("Push error %v: want the broken image named", err)
	}
	actions := map[string]Action{}
	for _, st := range steps {
		actions[st.Image.Name] = st.Action
	}
	if actions["multi"] != Copied || actions["single"] != Copied || actions["broken"] != Failed {
		t.Fatalf("actions %v", actions)
	}
	if dst.unauthorized.Load() == 0 {
		t.Errorf("the target never asked for credentials: the auth path was not exercised")
	}

	// Digests equal on both sides, the index whole with both platforms.
	got, err := remote.Index(mustRef(t, dst.host()+"/mirror/"+imageref.Path(set.Images[1].Ref)+":v1"), remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := got.Digest(); d != idxDigest {
		t.Errorf("mirrored index digest %s, want %s", d, idxDigest)
	}
	im, _ := got.IndexManifest()
	if len(im.Manifests) != 2 {
		t.Fatalf("mirrored index has %d manifests, want 2", len(im.Manifests))
	}
	for _, m := range im.Manifests {
		child, err := got.Image(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		layers, _ := child.Layers()
		for _, l := range layers {
			if _, err := l.Size(); err != nil {
				t.Errorf("%s layer: %v", m.Platform, err)
			}
		}
		// Every blob is really there.
		if err := validateBlobs(child); err != nil {
			t.Errorf("platform %s: %v", m.Platform, err)
		}
	}
	single, err := remote.Head(mustRef(t, dst.host()+"/mirror/"+imageref.Path(set.Images[2].Ref)+":v2"), remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil || single.Digest != imgDigest {
		t.Errorf("mirrored single image %v, %v; want %s", single, err, imgDigest)
	}

	// Second run: nothing is copied, the broken image is still named.
	uploads, puts := dst.blobUploads.Load(), dst.manifestPuts.Load()
	if uploads == 0 {
		t.Fatal("no blob uploads counted on the first run")
	}
	steps, err = Push(ctx, set, to, opts)
	if err == nil || !strings.Contains(err.Error(), "broken") {
		t.Errorf("second push error %v", err)
	}
	for _, st := range steps {
		if st.Image.Name != "broken" && st.Action != Present {
			t.Errorf("second run: %s %s, want present", st.Image.Name, st.Action)
		}
	}
	if d := dst.blobUploads.Load() - uploads; d != 0 {
		t.Errorf("second run uploaded %d blobs, want 0", d)
	}
	if d := dst.manifestPuts.Load() - puts; d != 0 {
		t.Errorf("second run put %d manifests, want 0", d)
	}
	plan, err = Plan(ctx, set, to, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range plan {
		if want := st.Image.Name != "broken"; st.Present != want {
			t.Errorf("plan after push: %s present=%v, want %v", st.Image.Name, st.Present, want)
		}
	}

	// Without credentials the target refuses: the keychain really mattered.
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	if _, err := Push(ctx, set, dst.host()+"/other", opts); err == nil || !strings.Contains(err.Error(), "3 of 3") {
		t.Errorf("push without credentials: %v", err)
	}
}

func validateBlobs(img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func mustRef(t *testing.T, s string) name.Reference {
	r, err := name.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestPin(t *testing.T) {
	src := newRegistry(t, "", "")
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(mustRef(t, src.host()+"/app:v3"), img); err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	dir := t.TempDir()
	writeDockerfile(t, dir, "app", "FROM "+src.host()+"/app:v3@sha256:"+strings.Repeat("0", 64)+"\n")
	set, _, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Pin(context.Background(), set, Options{}); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(filepath.Join(dir, "app", "Dockerfile"))
	if got := string(data); got != "FROM "+src.host()+"/app:v3@"+want.String()+"\n" {
		t.Errorf("pinned Dockerfile %q, want digest %s", got, want)
	}
}
