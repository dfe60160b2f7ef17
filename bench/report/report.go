// Package report turns rollout measurements into what users read: a CSV
// of every pull, a Markdown summary and box plots per image size.
package report

import (
	"encoding/csv"
	"fmt"
	"image/color"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// Pull is one node's pull in one run.
type Pull struct {
	Mode     string // "baseline" (no agent) or "fleetmirror"
	Scenario string // "create" or "update"
	Image    string // e.g. "100MB-4layer"
	Node     string
	Batch    int
	Duration time.Duration
}

// Traffic is what one run moved, over all nodes.
type Traffic struct {
	Mode, Scenario, Image string
	UpstreamBytes         int64
	PeerBytes             int64
}

// Stats summarise pull times.
type Stats struct {
	N                        int
	Min, P50, Mean, P99, Max time.Duration
}

// Summarize computes the statistics of durations (nearest-rank percentiles).
func Summarize(ds []time.Duration) Stats {
	if len(ds) == 0 {
		return Stats{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	rank := func(p float64) time.Duration {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return Stats{N: len(s), Min: s[0], P50: rank(0.50), Mean: sum / time.Duration(len(s)), P99: rank(0.99), Max: s[len(s)-1]}
}

// Results are all pulls and traffic of a benchmark run.
type Results struct {
	Pulls   []Pull
	Traffic []Traffic
	// Setup says how the run was made, printed atop the summary.
	Setup []string
}

func (r *Results) durations(mode, scenario, image string) []time.Duration {
	var ds []time.Duration
	for _, p := range r.Pulls {
		if p.Mode == mode && p.Scenario == scenario && p.Image == image {
			ds = append(ds, p.Duration)
		}
	}
	return ds
}

func (r *Results) traffic(mode, scenario, image string) Traffic {
	for _, t := range r.Traffic {
		if t.Mode == mode && t.Scenario == scenario && t.Image == image {
			return t
		}
	}
	return Traffic{}
}

func (r *Results) keys(f func(Pull) string) []string {
	var out []string
	for _, p := range r.Pulls {
		if k := f(p); !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

// WriteCSV writes one row per pull.
func (r *Results) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	cw.Write([]string{"mode", "scenario", "image", "node", "batch", "seconds"})
	for _, p := range r.Pulls {
		cw.Write([]string{p.Mode, p.Scenario, p.Image, p.Node, strconv.Itoa(p.Batch), strconv.FormatFloat(p.Duration.Seconds(), 'f', 3, 64)})
	}
	cw.Flush()
	return cw.Error()
}

// WriteMarkdown writes the summary table: per scenario and image, pull
// times with and without the agent, upstream and peer bytes, and the ratio
// of mean pull times.
func (r *Results) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	b.WriteString("# Rollout benchmark\n\n")
	for _, s := range r.Setup {
		fmt.Fprintf(&b, "- %s\n", s)
	}
	b.WriteString("\n| scenario | image | mode | n | min | p50 | mean | p99 | max | upstream MB | peer MB | mean vs baseline |\n")
	b.WriteString("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	for _, sc := range r.keys(func(p Pull) string { return p.Scenario }) {
		for _, img := range r.keys(func(p Pull) string { return p.Image }) {
			base := Summarize(r.durations("baseline", sc, img))
			for _, mode := range r.keys(func(p Pull) string { return p.Mode }) {
				st := Summarize(r.durations(mode, sc, img))
				if st.N == 0 {
					continue
				}
				t := r.traffic(mode, sc, img)
				ratio := "-"
				if base.N > 0 && mode != "baseline" {
					ratio = fmt.Sprintf("%.2fx", st.Mean.Seconds()/base.Mean.Seconds())
				}
				fmt.Fprintf(&b, "| %s | %s | %s | %d | %s | %s | %s | %s | %s | %.0f | %.0f | %s |\n", sc, img, mode, st.N,
					sec(st.Min), sec(st.P50), sec(st.Mean), sec(st.P99), sec(st.Max),
					float64(t.UpstreamBytes)/1e6, float64(t.PeerBytes)/1e6, ratio)
			}
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func sec(d time.Duration) string { return fmt.Sprintf("%.2fs", d.Seconds()) }

// WritePlots writes a box plot per scenario and image size into dir
// (rollout-update-1GB.png): pull times of each layer count, baseline beside
// fleetmirror, on an axis that suits the size.
func (r *Results) WritePlots(dir string) ([]string, error) {
	var files []string
	modes := r.keys(func(p Pull) string { return p.Mode })
	sizes := r.keys(func(p Pull) string { size, _, _ := strings.Cut(p.Image, "-"); return size })
	for _, sc := range r.keys(func(p Pull) string { return p.Scenario }) {
		for _, size := range sizes {
			var images []string
			for _, img := range r.keys(func(p Pull) string { return p.Image }) {
				if strings.HasPrefix(img, size+"-") {
					images = append(images, img)
				}
			}
			file := filepath.Join(dir, "rollout-"+sc+"-"+size+".png")
			if err := r.plot(file, sc, size, modes, images); err != nil {
				return nil, err
			}
			files = append(files, file)
		}
	}
	return files, nil
}

func (r *Results) plot(file, scenario, size string, modes, images []string) error {
	p := plot.New()
	p.Title.Text = "pull time per node, " + scenario + ", " + size + ": " + strings.Join(modes, " (white), ") + " (blue)"
	p.Y.Label.Text = "seconds"
	p.Y.Min = 0
	width := vg.Points(18)
	for i, img := range images {
		for j, mode := range modes {
			ds := r.durations(mode, scenario, img)
			if len(ds) == 0 {
				continue
			}
			vals := make(plotter.Values, len(ds))
			for k, d := range ds {
				vals[k] = d.Seconds()
			}
			box, err := plotter.NewBoxPlot(width, float64(i), vals)
			if err != nil {
				return err
			}
			box.Offset = vg.Length(float64(j)-float64(len(modes)-1)/2) * (width + 2)
			if mode != "baseline" {
				box.FillColor = plotColor
			}
			p.Add(box)
		}
	}
	p.NominalX(images...)
	return p.Save(vg.Length(160+140*len(images)), 8*vg.Centimeter, file)
}

// WriteAll writes results.csv, summary.md and the plots into dir.
func (r *Results) WriteAll(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	files := []string{filepath.Join(dir, "results.csv"), filepath.Join(dir, "summary.md")}
	for i, write := range []func(io.Writer) error{r.WriteCSV, r.WriteMarkdown} {
		f, err := os.Create(files[i])
		if err != nil {
			return nil, err
		}
		if err := write(f); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
	}
	plots, err := r.WritePlots(dir)
	return append(files, plots...), err
}

// plotColor fills fleetmirror's boxes so they stand apart from baseline's.
var plotColor = color.RGBA{R: 66, G: 133, B: 244, A: 255}
