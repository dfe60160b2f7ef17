// Command crdgen writes the Spegel CRD (crds/ and the operator chart's
// copy) from helm-charts/spegel/values.schema.json; see operator/crd.
// Run it from the repository's root: go run ./hack/crdgen [-check].
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"

	"github.com/fleetmirror/fleetmirror/operator/crd"
)

func main() {
	check := flag.Bool("check", false, "change nothing; exit 1 when a CRD file differs from the generated one")
	flag.Parse()
	if err := run(*check); err != nil {
		fmt.Fprintln(os.Stderr, "crdgen:", err)
		os.Exit(1)
	}
}

func run(check bool) error {
	src, err := os.ReadFile(crd.ChartSchema)
	if err != nil {
		return fmt.Errorf("%w (run from the repository's root)", err)
	}
	want, err := crd.Generate(src)
	if err != nil {
		return err
	}
	for _, f := range crd.Files {
		if check {
			got, err := os.ReadFile(f)
			if err != nil || !bytes.Equal(got, want) {
				return fmt.Errorf("%s is not what %s generates from %s; run %s", f, crd.Command, crd.ChartSchema, crd.Command)
			}
			continue
		}
		if err := os.WriteFile(f, want, 0o644); err != nil {
			return err
		}
	}
	return nil
}
