# fleetmirror. `make demo` runs a local multi-node demo, `make test` every
# test; both set up what they need (apt packages, tools built from the Go
# module proxy and cached by version under $(FLEETMIRROR_TOOLS)).
SHELL := /bin/bash
GO ?= go
export FLEETMIRROR_TOOLS ?= /var/cache/fleetmirror/tools
export GOFLAGS ?= -buildvcs=false
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/fleetmirror/fleetmirror/agent/version.Version=$(VERSION)

.PHONY: all build tools test unit e2e demo bench lint fuzz clean

all: build

## build: static binaries into bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/agent ./cmd/agent

## tools: apt packages and test tools (containerd 2.x, ...), cached by version
tools:
	bash hack/tools.sh >/dev/null

## lint: gofmt, go vet, no legacy registry paths
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed on: $$out"; exit 1; fi
	$(GO) vet ./...
	bash hack/legacy-registries.sh

## unit: unit and integration tests of the packages (real containerd for the store)
unit: tools
	$(GO) test -count=1 -timeout 20m ./agent/... ./cmd/...

## fuzz: a short run of every fuzz test
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseRequest -fuzztime 20s ./agent/oci/
	$(GO) test -run '^$$' -fuzz FuzzParseImage -fuzztime 20s ./agent/oci/

## e2e: the multi-node suite on real containerd 2.x and 1.6 in network namespaces
e2e: tools build
	FLEETMIRROR_AGENT=$(CURDIR)/bin/agent $(GO) test -count=1 -timeout 30m ./test/... -v 2>&1 | tee e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; exit $${PIPESTATUS[0]}

## test: everything CI runs
test: lint unit e2e

## demo: a 3-node cluster, a pull on node 1 then nodes 2 and 3; Ctrl-C ends it
demo: tools build
	$(GO) run ./test/demo -agent $(CURDIR)/bin/agent

## bench: pull benchmarks on a local cluster and micro benchmarks (benchstat-friendly);
## FLEETMIRROR_BENCH_IMAGES=10MB/1,100MB/1,1GB/4 picks the images
bench: tools build
	FLEETMIRROR_AGENT=$(CURDIR)/bin/agent $(GO) test -run '^$$' -bench . -benchtime 3x -timeout 60m ./bench/ | tee bench.txt
	$(GO) test -run '^$$' -bench . -benchmem ./agent/... | tee -a bench.txt
	$(GO) run ./bench/rollout -agent $(CURDIR)/bin/agent -out bench/results

clean:
	rm -rf bin e2e.log bench.txt
