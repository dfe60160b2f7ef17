package store

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// fakeIngest lays out an ingest as containerd does (ref, total, data) with
// an empty data file, and returns the data file's path.
func fakeIngest(t *testing.T, dir string, dgst digest.Digest, total int) string {
	t.Helper()
	ing := filepath.Join(dir, "ingest", "0123abcd")
	if err := os.MkdirAll(ing, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{
		"ref":   "k8s.io/1/layer-" + dgst.String(),
		"total": strconv.Itoa(total),
		"data":  "",
	} {
		if err := os.WriteFile(filepath.Join(ing, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(ing, "data")
}

// An ingest containerd opened but has no byte in yet (its containerd
// waits for upstream) is waited for longer than the stall timeout: the
// first bytes are read once they come. Once bytes came, the stall timeout
// applies again.
func TestInFlightWaitsLongerForTheFirstByte(t *testing.T) {
	ctx, g, data := openEmptyIngest(t, "slow upstream", 10*time.Second)
	// Several stall timeouts pass before the writer's first bytes.
	time.AfterFunc(400*time.Millisecond, func() { os.WriteFile(data, make([]byte, 1000), 0o644) })
	buf := make([]byte, 4096)
	n, err := g.Read(buf)
	if err != nil || n != 1000 {
		t.Fatalf("read %d bytes, err %v; want the writer's first 1000", n, err)
	}
	// The writer stops mid-blob: the stall timeout, not the first-byte wait.
	if _, err := g.Read(buf); err == nil {
		t.Fatal("a stalled writer read without error")
	}
	if ctx.Err() != nil {
		t.Error("the stalled read waited for the test's deadline, not the stall timeout")
	}
}

// The first-byte wait is bounded too.
func TestInFlightFirstByteWaitIsBounded(t *testing.T) {
	ctx, g, _ := openEmptyIngest(t, "upstream never answers", 200*time.Millisecond)
	if _, err := g.Read(make([]byte, 10)); err == nil || ctx.Err() != nil {
		t.Fatalf("err %v (deadline %v); want the first-byte wait to end the read", err, ctx.Err())
	}
}

// WriteTo (what io.Copy uses, in pieces the size of what the writer has
// written, for sendfile) sends the blob as it grows, through to its end.
func TestInFlightWriteToFollowsTheWriter(t *testing.T) {
	dir := t.TempDir()
	blob := make([]byte, 3000)
	for i := range blob {
		blob[i] = byte(i)
	}
	dgst := digest.FromBytes(blob)
	data := fakeIngest(t, dir, dgst, len(blob))
	fl := NewInFlight(dir, 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	g, err := fl.Open(ctx, dgst, 500, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	go func() {
		f, err := os.OpenFile(data, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		for i := 0; i < len(blob); i += 1000 {
			time.Sleep(30 * time.Millisecond)
			f.Write(blob[i : i+1000])
		}
	}()
	var out bytes.Buffer
	n, err := g.WriteTo(&out)
	if err != nil || n != 2500 || !bytes.Equal(out.Bytes(), blob[500:]) {
		t.Fatalf("wrote %d bytes, err %v; want the 2500 from offset 500", n, err)
	}
}

// openEmptyIngest opens, in flight, an ingest of 2000 bytes that has none
// yet, with a stall timeout of 50 ms and the given first-byte wait; ctx is
// the test's own deadline, well past both. data is the ingest's data file.
func openEmptyIngest(t *testing.T, name string, first time.Duration) (ctx context.Context, g *Growing, data string) {
	t.Helper()
	dir := t.TempDir()
	dgst := digest.FromString(name)
	data = fakeIngest(t, dir, dgst, 2000)
	fl := NewInFlight(dir, 50*time.Millisecond)
	fl.first = first
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	g, err := fl.Open(ctx, dgst, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return ctx, g, data
}
