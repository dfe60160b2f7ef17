package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/bench/workload"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// BenchmarkAgentMemory fills node 2's containerd with 100 images of 100
// layers each, 10,000 digests and more, and reports the agent's memory once
// it advertises them all.
func BenchmarkAgentMemory(b *testing.B) {
	c := benchCluster(b)
	n2 := c.Node(2)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	cl, err := client.New(n2.Socket)
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	ctx, done, err := cl.WithLease(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer done(context.Background())
	cs := cl.ContentStore()
	const imagesN, layersN = 100, 100
	write := func(mediaType string, data []byte, labels map[string]string) ocispec.Descriptor {
		desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}
		if err := content.WriteBlob(ctx, cs, desc.Digest.String(), bytesReader(data), desc, content.WithLabels(labels)); err != nil {
			b.Fatal(err)
		}
		return desc
	}
	for i := range imagesN {
		man := ocispec.Manifest{Versioned: specsV2, MediaType: ocispec.MediaTypeImageManifest}
		labels := map[string]string{}
		man.Config = write(ocispec.MediaTypeImageConfig, []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","n":%d}`, i)), nil)
		labels["containerd.io/gc.ref.content.config"] = man.Config.Digest.String()
		for l := range layersN {
			d := write(ocispec.MediaTypeImageLayer, []byte(fmt.Sprintf("layer %d of image %d", l, i)), nil)
			man.Layers = append(man.Layers, d)
			labels[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", l)] = d.Digest.String()
		}
		md := write(ocispec.MediaTypeImageManifest, mustJSON(b, man), labels)
		if _, err := cl.ImageService().Create(ctx, images.Image{Name: fmt.Sprintf("%s/memory/img%d:v1", c.Upstream.Host(), i), Target: md}); err != nil {
			b.Fatal(err)
		}
	}
	want := imagesN * (layersN + 2)
	start := time.Now()
	if err := workload.WaitAdvertised(context.Background(), n2, want); err != nil {
		b.Fatal(err)
	}
	b.Logf("%d digests advertised %s after the last image was created", want, time.Since(start).Round(time.Millisecond))
	for b.Loop() {
		time.Sleep(time.Second)
	}
	b.ReportMetric(workload.RSSMiB(n2.AgentPID(), "VmRSS"), "rss-1s-MiB")
	// The Go runtime hands freed memory back to the OS over a few seconds
	// after the advertising burst: what the node pays while idle.
	time.Sleep(20 * time.Second)
	b.ReportMetric(workload.RSSMiB(n2.AgentPID(), "VmRSS"), "rss-MiB")
	b.ReportMetric(workload.RSSMiB(n2.AgentPID(), "RssAnon"), "anon-rss-MiB")
	if out := os.Getenv("FLEETMIRROR_BENCH_HEAP"); out != "" {
		saveProfile(b, pprofURL(n2, "heap"), out)
	}
	b.ReportMetric(workload.RSSMiB(n2.AgentPID(), "VmHWM"), "peak-rss-MiB")
	b.ReportMetric(float64(want), "digests")
}

var specsV2 = specs.Versioned{SchemaVersion: 2}

func mustJSON(b *testing.B, v any) []byte {
	data, err := json.Marshal(v)
	if err != nil {
		b.Fatal(err)
	}
	return data
}

func bytesReader(data []byte) *bytes.Reader { return bytes.NewReader(data) }

// pprofURL is where the node's agent serves a profile (with --debug-pprof).
func pprofURL(n *cluster.Node, profile string) string {
	return "http://" + netip.AddrPortFrom(n.IP, cluster.AgentMetricsPort).String() + "/debug/pprof/" + profile
}

// saveProfile keeps an agent's profile (agents started with
// --debug-pprof) for `go tool pprof`.
func saveProfile(b *testing.B, url, path string) {
	resp, err := http.Get(url)
	if err != nil {
		b.Error(err)
		return
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		b.Errorf("%s: %s (is the agent started with --debug-pprof?)", url, resp.Status)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		b.Error(err)
		return
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		b.Error(err)
	}
}
