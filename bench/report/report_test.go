package report

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Second)
	}
	s := Summarize(ds)
	want := Stats{N: 100, Min: time.Second, P50: 50 * time.Second, Mean: 50500 * time.Millisecond, P99: 99 * time.Second, Max: 100 * time.Second}
	if s != want {
		t.Fatalf("got %+v, want %+v", s, want)
	}
	if one := Summarize([]time.Duration{3 * time.Second}); one.P99 != 3*time.Second || one.P50 != 3*time.Second {
		t.Fatalf("one sample: %+v", one)
	}
	if Summarize(nil).N != 0 {
		t.Fatal("empty input")
	}
}

func TestWriteAll(t *testing.T) {
	r := &Results{Setup: []string{"6 nodes"}}
	for i, mode := range []string{"baseline", "fleetmirror"} {
		for n := 1; n <= 4; n++ {
			r.Pulls = append(r.Pulls, Pull{Mode: mode, Scenario: "update", Image: "10MB-1layer", Node: "n" + string(rune('0'+n)),
				Duration: time.Duration(n*(2-i)) * time.Second})
		}
		r.Traffic = append(r.Traffic, Traffic{Mode: mode, Scenario: "update", Image: "10MB-1layer", UpstreamBytes: int64(40e6 / (i*3 + 1)), PeerBytes: int64(i * 30e6)})
	}
	dir := t.TempDir()
	files, err := r.WriteAll(dir)
	if err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "summary.md"))
	if err != nil {
		t.Fatal(err)
	}
	// fleetmirror's mean is 2.5s against baseline's 5s.
	if !bytes.Contains(md, []byte("| update | 10MB-1layer | fleetmirror | 4 | 1.00s | 2.00s | 2.50s | 4.00s | 4.00s | 10 | 30 | 0.50x |")) {
		t.Fatalf("summary:\n%s", md)
	}
	csv, _ := os.ReadFile(filepath.Join(dir, "results.csv"))
	if got := strings.Count(string(csv), "\n"); got != 9 {
		t.Fatalf("csv has %d lines, want 9", got)
	}
	if len(files) != 3 {
		t.Fatalf("files %v", files)
	}
	if fi, err := os.Stat(files[2]); err != nil || fi.Size() < 1000 {
		t.Fatalf("plot %v: %v", files[2], err)
	}
}
