# fleetmirror. `make demo` runs a local multi-node demo, `make test` every
# test; both set up what they need (apt packages, tools built from the Go
# module proxy and cached by version under $(FLEETMIRROR_TOOLS)).
SHELL := /bin/bash
GO ?= go
export FLEETMIRROR_TOOLS ?= /var/cache/fleetmirror/tools
export GOFLAGS ?= -buildvcs=false
# The release version: the VERSION file, the one place it is set
# (hack/set-version.sh X.Y.Z also updates the charts that repeat it).
VERSION ?= $(shell cat VERSION)
LDFLAGS := -s -w -X github.com/fleetmirror/fleetmirror/agent/version.Version=$(VERSION)

.PHONY: release agent-prev all build tools test unit e2e demo bench lint fuzz clean images images-check release-images mirror-images operator-test kube-e2e system-e2e crds

all: build

## build: static binaries into bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/agent ./cmd/agent
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/operator ./cmd/operator
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/mirror-images ./cmd/mirror-images

## tools: apt packages and test tools (containerd 2.x, ...), cached by version
tools:
	bash hack/tools.sh >/dev/null

## crds: the Spegel CRD (crds/, helm-charts/operator/crds/) generated from
## helm-charts/spegel/values.schema.json (operator/crd)
crds:
	$(GO) run ./hack/crdgen

## lint: gofmt, go vet, no legacy registry paths, the CRDs in step with the chart's schema
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed on: $$out"; exit 1; fi
	$(GO) vet ./...
	bash hack/legacy-registries.sh
	$(GO) run ./cmd/mirror-images lint
	$(GO) run ./cmd/mirror-images check
	$(GO) run ./hack/crdgen -check

## unit: unit and integration tests of the packages (real containerd for the store)
unit: tools
	$(GO) test -count=1 -timeout 20m ./agent/... ./cmd/... ./bench/... ./operator/imageref/... ./release/...

## fuzz: a short run of every fuzz test
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseRequest -fuzztime 20s ./agent/oci/
	$(GO) test -run '^$$' -fuzz FuzzParseImage -fuzztime 20s ./agent/oci/
	$(GO) test -run '^$$' -fuzz FuzzPatch -fuzztime 20s ./agent/prep/
	$(GO) test -run '^$$' -fuzz FuzzPrepend -fuzztime 20s ./agent/hosts/
	$(GO) test -run '^$$' -fuzz FuzzMirror -fuzztime 20s ./operator/imageref/

## images: our images (agent, operator) built without a Docker daemon into
## bin/images/<name> (OCI layouts); PUSH=registry[/prefix] also pushes them
IMAGES ?= agent $(if $(wildcard cmd/operator/*.go),$(if $(wildcard watches.yaml),operator))
PLATFORMS ?= linux/amd64
images:
	$(GO) run ./cmd/images --images "$(strip $(IMAGES))" --version $(VERSION) --platforms $(PLATFORMS) --out $(or $(IMAGES_OUT),bin/images) $(if $(PUSH),--push $(PUSH))

## images-check: `make images` twice gives the same digests
images-check:
	@mkdir -p bin
	$(MAKE) -s --no-print-directory images VERSION=$(VERSION) IMAGES_OUT=bin/images-a >bin/images-a.txt
	$(MAKE) -s --no-print-directory images VERSION=$(VERSION) IMAGES_OUT=bin/images-b >bin/images-b.txt
	@diff bin/images-a.txt bin/images-b.txt && cat bin/images-a.txt

## release-images: MIRROR=registry[:port][/prefix]: our images (amd64, arm64)
## and the third-party set pushed there, and the images map rewritten
release-images:
	@test -n "$(MIRROR)" || { echo "release-images: set MIRROR=registry[:port][/prefix]" >&2; exit 2; }
	$(GO) run ./cmd/images --images "$(strip $(IMAGES))" --version $(VERSION) --platforms linux/amd64,linux/arm64 --push $(MIRROR) --refs bin/images/refs
	$(GO) run ./cmd/mirror-images push --to $(MIRROR)
	$(GO) run ./cmd/mirror-images write-map $$(sed 's/^/--set /' bin/images/refs)

## release: REGISTRY=host[:port][/prefix]: release VERSION (the VERSION file's):
## our images (amd64, arm64, no daemon) pushed to REGISTRY at their imageMirror
## path, the images map (mirror-images/images.yaml) given their digests, and
## both charts packaged (bin/release/) and pushed to oci://REGISTRY/helm-charts,
## the operator chart's images pinned by those digests. PLAIN_HTTP=1 for a
## registry without TLS.
HELM ?= $(FLEETMIRROR_TOOLS)/helm-v3.22.0/bin/helm
RELEASE_PLATFORMS ?= linux/amd64,linux/arm64
release:
	@test -n "$(REGISTRY)" || { echo "release: set REGISTRY=host[:port][/prefix]" >&2; exit 2; }
	@test "$(VERSION)" = "$$(cat VERSION)" || { echo "release: VERSION=$(VERSION) but the VERSION file says $$(cat VERSION); run hack/set-version.sh $(VERSION) and commit first" >&2; exit 2; }
	@test -x "$(HELM)" || { echo "release: no helm at $(HELM): run make tools" >&2; exit 2; }
	$(GO) test -count=1 -run TestRepositoryAgrees ./release/version
	rm -rf bin/release && mkdir -p bin/release bin/images
	$(GO) run ./cmd/images --images "$(strip $(IMAGES))" --version $(VERSION) --revision "$$(git rev-parse HEAD 2>/dev/null)" --platforms $(RELEASE_PLATFORMS) --push $(REGISTRY) --refs bin/images/refs
	$(GO) run ./cmd/mirror-images write-map $$(sed 's/^/--set /' bin/images/refs)
	HELM=$(HELM) PLAIN_HTTP=$(PLAIN_HTTP) bash hack/release-charts.sh $(VERSION) bin/images/refs $(REGISTRY) bin/release
	@echo "released $(VERSION): helm install fleetmirror oci://$(REGISTRY)/helm-charts/fleetmirror-operator --version $(VERSION) --set imageMirror=$(REGISTRY)"

## mirror-images: lint the third-party set and the images map; MIRROR=... also plans the copy
mirror-images:
	$(GO) run ./cmd/mirror-images lint
	$(GO) run ./cmd/mirror-images check
	$(if $(MIRROR),$(GO) run ./cmd/mirror-images plan --to $(MIRROR))

## e2e: the multi-node suite on real containerd 2.x and 1.6 in network namespaces
## (test artifacts such as the debug page's screenshot: bin/test-artifacts)
e2e: tools build agent-prev
	mkdir -p bin/test-artifacts
	FLEETMIRROR_AGENT=$(CURDIR)/bin/agent FLEETMIRROR_AGENT_PREV=$(CURDIR)/bin/agent-prev $(GO) test -count=1 -timeout 30m -artifacts -outputdir $(CURDIR)/bin/test-artifacts ./test/cluster/ ./test/e2e/ -v 2>&1 | tee e2e.log | awk -f hack/testlog.awk ; exit $${PIPESTATUS[0]}

## agent-prev: the agent of the previous release (PREV_AGENT_REF), for the
## mixed-version test a rolling update needs (test/e2e/mixed_test.go)
PREV_AGENT_REF ?= b1a42eb
agent-prev:
	@git cat-file -e $(PREV_AGENT_REF)^{commit} 2>/dev/null || git fetch -q --unshallow 2>/dev/null || true
	@git cat-file -e $(PREV_AGENT_REF)^{commit} 2>/dev/null || { echo "agent-prev: commit $(PREV_AGENT_REF) is not in this clone; fetch the full history (git fetch --unshallow)" >&2; exit 1; }
	rm -rf bin/prev-src && mkdir -p bin/prev-src
	git archive $(PREV_AGENT_REF) | tar -x -C bin/prev-src
	cd bin/prev-src && CGO_ENABLED=0 $(GO) build -trimpath -o $(CURDIR)/bin/agent-prev ./cmd/agent

## operator-test: the operator's packages, and the addon chart and the
## operator's manager against a real kube-apiserver and etcd (envtest);
## golden files: go test ./test/operator -run TestChartGolden -update
operator-test: tools
	$(GO) test -count=1 -timeout 10m ./operator/values/ ./operator/crd/ ./operator/status/ ./operator/helmaction/ ./operator/manager/ ./operator/config/ ./operator/imagecheck/ ./operator/readiness/ ./operator/hitratio/ ./operator/mirrorpath/ ./cmd/operator/ ./test/operator/

## kube-e2e: a real 3-node Kubernetes cluster (control plane, kubelets,
## containerd 2.x, CNI) in network namespaces; DaemonSets on every node
kube-e2e: tools
	$(GO) test -count=1 -timeout 15m ./test/kube/ -v 2>&1 | tee kube-e2e.log | awk -v extra='babysit\.go' -f hack/testlog.awk ; exit $${PIPESTATUS[0]}

## test: everything CI runs
## system-e2e: the whole product on that cluster, as `make demo` narrates
## it (test/system): helm install, prep, peer pulls, faults, uninstall
system-e2e: tools
	$(GO) test -count=1 -timeout 25m ./test/system/ -v 2>&1 | tee system-e2e.log | awk -v extra='(system|install|privilege|mirrorpath|rollout|uninstall|migrate|report|pods|babysit)\.go' -f hack/testlog.awk ; exit $${PIPESTATUS[0]}

test: lint unit operator-test images-check e2e kube-e2e system-e2e

## demo: the whole product on a local 3-node Kubernetes cluster, narrated
## (test/system): helm install, prep, peer pulls in a rollout, faults,
## uninstall, the rollout without the addon; ends by itself
demo: tools
	@mkdir -p bin
	$(GO) run ./test/demo

## bench: pull benchmarks on a local cluster and micro benchmarks (benchstat-friendly);
## FLEETMIRROR_BENCH_IMAGES=10MB/1,100MB/1,1GB/4 picks the images
bench: tools build
	FLEETMIRROR_AGENT=$(CURDIR)/bin/agent $(GO) test -run '^$$' -bench . -benchtime 3x -timeout 60m ./bench/ | tee bench.txt
	$(GO) test -run '^$$' -bench . -benchmem ./agent/... | tee -a bench.txt
	$(GO) run ./bench/rollout -agent $(CURDIR)/bin/agent -out bench/results

clean:
	rm -rf bin e2e.log kube-e2e.log system-e2e.log bench.txt
