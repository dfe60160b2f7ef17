package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// Pinned in hack/tools.sh, which builds them into the tools dir.
const (
	conformanceVersion = "v0.0.0-20260831232431-97274622c111"
	craneVersion       = "v0.22.1"
)

// clientsRepo is the one repository every client reads: the conformance
// suite's read-only mode asks for all its data in one.
const clientsRepo = "e2e/clients"

// content is what one pushed tag consists of.
type content struct {
	tag       string
	oci       bool // OCI media types, else Docker ones
	root      digest.Digest
	manifests []digest.Digest // root first, then the images of an index
	blobs     []digest.Digest // configs and layers
}

func (c content) all() []digest.Digest { return append(slices.Clone(c.manifests), c.blobs...) }

// TestIndependentClients points the clients people debug a registry with
// at a real agent on real containerd 2.x, holding OCI and Docker images,
// an OCI index and a Docker manifest list: the OCI distribution-spec
// conformance suite (pull, read-only), skopeo and crane. They ask without
// the ns parameter that containerd sends, so tags resolve from the node's
// own store.
func TestIndependentClients(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the e2e suite needs root for network namespaces")
	}
	tools := cluster.ToolsDir()
	conformance := filepath.Join(tools, "oci-conformance-"+conformanceVersion, "bin", "conformance")
	crane := filepath.Join(tools, "crane-"+craneVersion, "bin", "crane")
	skopeo, err := exec.LookPath("skopeo")
	if err != nil {
		t.Fatal("skopeo is missing: run `make tools` (hack/tools.sh installs it)")
	}
	for _, p := range []string{conformance, crane} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s is missing: run `make tools` (hack/tools.sh builds it)", p)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	// Open: these clients run outside the node and speak the protocol,
	// not membership (the registry gate is proven in TestTrust).
	c := startCluster(t, ctx, cluster.Options{Nodes: 1, Containerd: cluster.Containerd2, AgentBin: agentBin(t), Logf: t.Logf, OpenNetwork: true})
	n := c.Node(1)

	// The OCI image goes through CRI and the agent as kubelet pulls; the
	// rest are fetched with every platform, since clients copy whole indexes.
	// gzip layers: crane validate reads every layer as gzip.
	ociImg := testImage(t, true, runtime.GOARCH)
	ociRef := c.Upstream.Ref(clientsRepo + ":oci")
	if err := c.Upstream.Push(ctx, ociRef, ociImg); err != nil {
		t.Fatal(err)
	}
	oci := imageContent(t, ociImg)
	oci.tag, oci.oci = "oci", true
	items := []content{oci}
	if _, err := n.Pull(ctx, ociRef); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		tag   string
		image v1.Image
		index v1.ImageIndex
	}{
		{tag: "docker", image: testImage(t, false, "amd64")},
		{tag: "index", index: testIndex(t, true)},
		{tag: "list", index: testIndex(t, false)},
	} {
		ref := c.Upstream.Ref(clientsRepo + ":" + x.tag)
		var it content
		if x.image != nil {
			err = c.Upstream.Push(ctx, ref, x.image)
			it = imageContent(t, x.image)
		} else {
			err = c.Upstream.PushIndex(ctx, ref, x.index)
			it = indexContent(t, x.index)
		}
		if err != nil {
			t.Fatal(err)
		}
		it.tag, it.oci = x.tag, x.tag == "index"
		items = append(items, it)
		if err := n.FetchAllPlatforms(ctx, ref); err != nil {
			t.Fatal(err)
		}
	}
	var tags []string
	var all []digest.Digest
	for _, it := range items {
		tags = append(tags, it.tag)
		all = append(all, it.all()...)
	}
	slices.Sort(tags)
	if err := n.VerifyContent(ctx, all); err != nil {
		t.Fatalf("containerd lacks what the clients will ask for: %v", err)
	}
	addr := n.RegistryAddr()
	waitServed(t, ctx, addr, items)
	// Nothing below may reach the upstream: the agent answers alone.
	c.Upstream.Reset()

	start := time.Now()
	t.Run("conformance", func(t *testing.T) { runConformance(t, ctx, conformance, addr, items) })
	t.Logf("conformance suite took %s", time.Since(start).Round(time.Millisecond))
	t.Run("skopeo", func(t *testing.T) { runSkopeo(t, ctx, skopeo, addr, items, tags) })
	t.Run("crane", func(t *testing.T) { runCrane(t, ctx, crane, addr, items, tags) })
	if st := c.Upstream.Stats(); len(st.ByKind) != 0 {
		t.Errorf("clients of the agent caused upstream requests: %v", st.ByKind)
	}
}

// testImage is a small image of gzip layers with OCI or Docker media types.
func testImage(t *testing.T, oci bool, arch string) v1.Image {
	t.Helper()
	mt, cmt, lmt := types.DockerManifestSchema2, types.DockerConfigJSON, types.DockerLayer
	if oci {
		mt, cmt, lmt = types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, mt), cmt)
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", arch
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		l, err := random.Layer(256<<10, lmt)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

// testIndex is an OCI index, or a Docker manifest list, of amd64 and arm64.
func testIndex(t *testing.T, oci bool) v1.ImageIndex {
	t.Helper()
	mt := types.DockerManifestList
	if oci {
		mt = types.OCIImageIndex
	}
	idx := mutate.IndexMediaType(empty.Index, mt)
	for _, arch := range []string{"amd64", "arm64"} {
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: testImage(t, oci, arch),
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: arch}}})
	}
	return idx
}

func imageContent(t *testing.T, img v1.Image) content {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	c := content{root: digest.Digest(d.String()), manifests: []digest.Digest{digest.Digest(d.String())},
		blobs: []digest.Digest{digest.Digest(m.Config.Digest.String())}}
	for _, l := range m.Layers {
		c.blobs = append(c.blobs, digest.Digest(l.Digest.String()))
	}
	return c
}

func indexContent(t *testing.T, idx v1.ImageIndex) content {
	t.Helper()
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	c := content{root: digest.Digest(d.String()), manifests: []digest.Digest{digest.Digest(d.String())}}
	for _, desc := range m.Manifests {
		img, err := idx.Image(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		ic := imageContent(t, img)
		c.manifests = append(c.manifests, ic.manifests...)
		c.blobs = append(c.blobs, ic.blobs...)
	}
	return c
}

// waitServed waits until the agent's store has synced with containerd:
// every root manifest and blob is served by digest. Tags are left to the
// clients.
func waitServed(t *testing.T, ctx context.Context, addr string, items []content) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		missing := ""
		for _, it := range items {
			url := "http://" + addr + "/v2/" + clientsRepo + "/manifests/" + it.root.String()
			if _, status := cluster.TimeGet(ctx, url); status != 200 {
				missing = fmt.Sprintf("%s: %d", url, status)
				break
			}
			for _, d := range it.blobs {
				url := "http://" + addr + "/v2/" + clientsRepo + "/blobs/" + d.String()
				if _, status := cluster.TimeGet(ctx, url); status != 200 {
					missing = fmt.Sprintf("%s: %d", url, status)
					break
				}
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent does not serve what containerd holds after 30s: %s", missing)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// clientEnv is the environment of the clients: no proxy, so every request
// goes straight to the agent on the test subnet, and a private HOME.
func clientEnv(t *testing.T, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "HOME", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE":
			continue
		}
		if strings.HasPrefix(k, "OCI_") {
			continue
		}
		env = append(env, kv)
	}
	home := t.TempDir()
	return append(append(env, "HOME="+home, "NO_PROXY=*", "no_proxy=*"), extra...)
}

func runTool(t *testing.T, ctx context.Context, env []string, dir, bin string, args ...string) (stdout string, err error) {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env, cmd.Dir = env, dir
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s %s: %w\n%s%s", filepath.Base(bin), strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String(), err
}

// The pinned suite's report writers panic whenever push is disabled
// (ReportResultsYAML reads test data that push would have made), after it
// has printed its results and before it writes results.yaml and
// junit.xml. So the harness reads the printed results, and accepts that
// panic and no other.
var (
	knownReportPanic = regexp.MustCompile(`(?s)panic: runtime error: invalid memory address.*\(\*runner\)\.ReportResultsYAML`)
	resultLine       = regexp.MustCompile(`^(\s*)(OCI Conformance Test\S*(?: \S+)*): (Pass|FAIL|Error|Skip|Disabled|Unknown)$`)
	countLine        = regexp.MustCompile(`^\s+(Disabled|Skip|Pass|FAIL|Error)\.+:\s+(\d+)$`)
)

// conformanceResults reads the suite's printed results: each test with its
// status, in order, and the suite's own counts.
func conformanceResults(out string) (tests [][2]string, counts map[string]int, overall string) {
	counts = map[string]int{}
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if m := resultLine.FindStringSubmatch(l); m != nil {
			// A leaf is a line the next one does not nest under.
			leaf := i+1 >= len(lines) || len(leadingSpace(lines[i+1])) <= len(m[1]) || resultLine.FindStringSubmatch(lines[i+1]) == nil
			if leaf {
				tests = append(tests, [2]string{m[2], m[3]})
			}
		}
		if m := countLine.FindStringSubmatch(l); m != nil {
			var v int
			fmt.Sscan(m[2], &v)
			counts[m[1]] = v
		}
		if v, ok := strings.CutPrefix(l, "OCI Conformance Result: "); ok {
			overall = strings.TrimSpace(v)
		}
	}
	return tests, counts, overall
}

func leadingSpace(s string) string { return s[:len(s)-len(strings.TrimLeft(s, " "))] }

// runConformance runs the distribution-spec conformance suite's pull
// tests in read-only mode over every tag, manifest and blob the node holds.
func runConformance(t *testing.T, ctx context.Context, bin, addr string, items []content) {
	var tags, manifests, blobs []string
	for _, it := range items {
		tags = append(tags, it.tag)
		for _, d := range it.manifests {
			manifests = append(manifests, d.String())
		}
		for _, d := range it.blobs {
			blobs = append(blobs, d.String())
		}
	}
	dir := t.TempDir()
	env := clientEnv(t,
		"OCI_REGISTRY="+addr, "OCI_TLS=disabled", "OCI_REPO1="+clientsRepo, "OCI_REPO2="+clientsRepo+"2",
		"OCI_RESULTS_DIR="+filepath.Join(dir, "results"), "OCI_LOG=warn",
		// The switches the issue names (pull on; push, discovery and
		// management off), then tag listing back on, since the agent now
		// lists tags. Referrers stay off: the agent answers them 404.
		"OCI_TEST_PULL=1", "OCI_TEST_PUSH=0", "OCI_TEST_CONTENT_DISCOVERY=0", "OCI_TEST_CONTENT_MANAGEMENT=0",
		"OCI_API_TAGS_LIST=true",
		"OCI_RO_DATA_TAGS="+strings.Join(tags, " "),
		"OCI_RO_DATA_MANIFESTS="+strings.Join(manifests, " "),
		"OCI_RO_DATA_BLOBS="+strings.Join(blobs, " "),
	)
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env, cmd.Dir = env, dir
	raw, runErr := cmd.CombinedOutput()
	out := string(raw)
	if runErr != nil && !knownReportPanic.MatchString(out) {
		t.Fatalf("conformance suite: %v\n%s", runErr, out)
	}
	tests, counts, overall := conformanceResults(out)
	var summary strings.Builder
	for _, tc := range tests {
		fmt.Fprintf(&summary, "  %-7s %s\n", tc[1], tc[0])
		if tc[1] == "FAIL" || tc[1] == "Error" {
			t.Errorf("conformance %s: %s", tc[0], tc[1])
		}
	}
	t.Logf("conformance tests:\n%s", summary.String())
	t.Logf("conformance: %s; %d passed, %d failed, %d errors, %d skipped, %d disabled",
		overall, counts["Pass"], counts["FAIL"], counts["Error"], counts["Skip"], counts["Disabled"])
	if overall != "Pass" {
		t.Errorf("conformance result %q, want Pass:\n%s", overall, out)
	}
	// Every tag, manifest and blob is asked for with HEAD and GET; a suite
	// that ran less proves nothing.
	if want := 2 * (len(tags) + len(manifests) + len(blobs)); counts["Pass"] < want {
		t.Errorf("only %d conformance tests passed, want at least %d (HEAD and GET of every item):\n%s", counts["Pass"], want, out)
	}
}

// runSkopeo inspects by digest and tag (tags listed, not --no-tags) and
// copies every tag with --all, checking every copied blob.
func runSkopeo(t *testing.T, ctx context.Context, bin, addr string, items []content, tags []string) {
	env := clientEnv(t)
	for _, it := range items {
		for _, ref := range []string{clientsRepo + "@" + it.manifests[len(it.manifests)-1].String(), clientsRepo + ":" + it.tag} {
			out, err := runTool(t, ctx, env, "", bin, "--insecure-policy", "inspect", "--tls-verify=false", "docker://"+addr+"/"+ref)
			if err != nil {
				t.Error(err)
				continue
			}
			var info struct {
				Digest   digest.Digest
				RepoTags []string
			}
			if err := json.Unmarshal([]byte(out), &info); err != nil {
				t.Errorf("inspect %s: %v: %s", ref, err, out)
				continue
			}
			if !slices.Equal(info.RepoTags, tags) {
				t.Errorf("inspect %s: tags %v, want %v", ref, info.RepoTags, tags)
			}
			if !slices.Contains(it.manifests, info.Digest) {
				t.Errorf("inspect %s: digest %s is none of %v", ref, info.Digest, it.manifests)
			}
		}
		// --preserve-digests: skopeo fails rather than rewrite anything.
		// oci: takes the OCI image as it is; Docker media types would be
		// converted, so the rest go to dir:, which keeps bytes as served.
		// Except one: skopeo 1.9 re-encodes an OCI index when it copies
		// one with --all, whatever the destination, so that root is
		// checked by the images it lists, not by its digest.
		dest := filepath.Join(t.TempDir(), it.tag)
		args := []string{"--insecure-policy", "copy", "--all", "--src-tls-verify=false", "docker://" + addr + "/" + clientsRepo + ":" + it.tag}
		want := it
		switch {
		case it.oci && len(it.manifests) == 1:
			args = append(args, "--preserve-digests", "oci:"+dest+":"+it.tag)
		case it.oci:
			args = append(args, "dir:"+dest)
			want.manifests = it.manifests[1:]
		default:
			args = append(args, "--preserve-digests", "dir:"+dest)
		}
		if _, err := runTool(t, ctx, env, "", bin, args...); err != nil {
			t.Error(err)
			continue
		}
		if len(want.manifests) < len(it.manifests) {
			var idx struct {
				Manifests []struct{ Digest digest.Digest }
			}
			raw, err := os.ReadFile(filepath.Join(dest, "manifest.json"))
			if err == nil {
				err = json.Unmarshal(raw, &idx)
			}
			var got []digest.Digest
			for _, m := range idx.Manifests {
				got = append(got, m.Digest)
			}
			if err != nil || !slices.Equal(got, want.manifests) {
				t.Errorf("skopeo %s: copied index lists %v (%v), want %v", it.tag, got, err, want.manifests)
			}
		}
		verifyCopied(t, "skopeo "+it.tag, dest, want)
	}
}

// runCrane lists tags, validates every tag remotely (every blob is
// fetched and hashed) and pulls each into an OCI layout.
func runCrane(t *testing.T, ctx context.Context, bin, addr string, items []content, tags []string) {
	env := clientEnv(t)
	out, err := runTool(t, ctx, env, "", bin, "ls", "--insecure", addr+"/"+clientsRepo)
	if err != nil {
		t.Error(err)
	} else if got := strings.Fields(out); !slices.Equal(got, tags) {
		t.Errorf("crane ls: %v, want %v", got, tags)
	}
	for _, it := range items {
		ref := addr + "/" + clientsRepo + ":" + it.tag
		if out, err := runTool(t, ctx, env, "", bin, "validate", "--insecure", "--remote", ref); err != nil {
			t.Error(err)
		} else if !strings.Contains(out, "PASS") {
			t.Errorf("crane validate %s: %s", ref, out)
		}
		dest := filepath.Join(t.TempDir(), it.tag)
		if _, err := runTool(t, ctx, env, "", bin, "pull", "--insecure", "--format", "oci", ref, dest); err != nil {
			t.Error(err)
			continue
		}
		verifyCopied(t, "crane "+it.tag, dest, it)
	}
}

// verifyCopied checks a copy (an OCI layout or skopeo's dir:): every file
// named by a digest hashes to it, and every manifest and blob of the
// tag is there.
func verifyCopied(t *testing.T, what, dir string, it content) {
	t.Helper()
	found := map[digest.Digest]bool{}
	hexName := regexp.MustCompile(`^([0-9a-f]{64})(\.manifest\.json|\.tar)?$`)
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		name := d.Name()
		var want digest.Digest
		switch m := hexName.FindStringSubmatch(name); {
		case m != nil:
			want = digest.NewDigestFromEncoded(digest.SHA256, m[1])
		case name == "manifest.json" && filepath.Dir(path) == dir:
			if !slices.Contains(it.manifests, it.root) {
				return nil // re-encoded by the client, checked by the caller
			}
			want = it.root // skopeo's dir: top-level manifest, copied as is
		default:
			return nil // oci-layout, index.json, version
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		v := want.Verifier()
		if _, err := io.Copy(v, f); err != nil {
			return err
		}
		if !v.Verified() {
			return fmt.Errorf("%s does not hash to %s", path, want)
		}
		found[want] = true
		return nil
	})
	if err != nil {
		t.Errorf("%s: %v", what, err)
	}
	for _, d := range it.all() {
		if !found[d] {
			t.Errorf("%s: %s was not copied", what, d)
		}
	}
	t.Logf("%s: %d blobs and manifests copied and verified", what, len(found))
}
