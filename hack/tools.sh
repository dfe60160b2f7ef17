#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine and
# prints the folder that holds the built tools. Everything built from the Go
# module proxy is cached under a folder named for its version, so a second
# run only checks that the binaries are there.
set -euo pipefail

CONTAINERD2_VERSION=${CONTAINERD2_VERSION:-v2.4.2}
TOOLS=${FLEETMIRROR_TOOLS:-/var/cache/fleetmirror/tools}

log() { echo "tools: $*" >&2; }

need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nsenter >/dev/null || need_apt+=(util-linux)
[ -x /usr/bin/containerd ] || need_apt+=(containerd)
command -v dbus-daemon >/dev/null || need_apt+=(dbus)
# Headless Chromium for the debug page's browser test (test/e2e/web_test.go).
command -v chromium >/dev/null || need_apt+=(chromium)
# skopeo as an independent client of the agent's registry (test/e2e/clients_test.go).
command -v skopeo >/dev/null || need_apt+=(skopeo)
if [ ${#need_apt[@]} -gt 0 ]; then
	log "apt-get install ${need_apt[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq "${need_apt[@]}" >&2
fi

# go_tool DIR PKG@VERSION...: builds the packages into DIR/bin once.
go_tool() {
	local dir=$1; shift
	if [ -f "$dir/.done" ]; then return; fi
	log "building $* into $dir"
	mkdir -p "$dir/bin"
	for pkg in "$@"; do
		GOBIN="$dir/bin" GOFLAGS=-buildvcs=false CGO_ENABLED=0 go install "$pkg" >&2
	done
	touch "$dir/.done"
}

go_tool "$TOOLS/containerd-$CONTAINERD2_VERSION" \
	"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD2_VERSION" \
	"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD2_VERSION"

# module_tool DIR NAME [LDFLAGS]: builds the main of the tools module
# hack/tools/NAME into DIR/bin/NAME once. Those modules pin what
# `go install pkg@v` cannot (kube-apiserver needs replace directives for its
# staging modules).
module_tool() {
	local dir=$1 name=$2 ldflags=${3:-}
	if [ -f "$dir/.done" ]; then return; fi
	log "building hack/tools/$name into $dir (kube-apiserver: ~6 min cold)"
	mkdir -p "$dir/bin"
	(cd "$(dirname "$0")/tools/$name" &&
		GOFLAGS=-buildvcs=false CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/bin/$name" . >&2)
	touch "$dir/.done"
}

# kube-apiserver and etcd for the operator's envtest suites.
KUBE_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
module_tool "$TOOLS/etcd-$ETCD_VERSION" etcd
# The version stamp is what `helm` sees as the cluster's version (a chart's
# kubeVersion check); without it the server says v0.0.0-master.
kv=${KUBE_VERSION#v}
kube_ldflags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
-X k8s.io/component-base/version.gitMajor=${kv%%.*} -X k8s.io/component-base/version.gitMinor=$(echo "$kv" | cut -d. -f2) \
-X k8s.io/component-base/version.gitTreeState=clean"
module_tool "$TOOLS/kube-$KUBE_VERSION" kube-apiserver "$kube_ldflags"

# The rest of a Kubernetes cluster for test/kube: kubelet,
# kube-controller-manager and kube-scheduler (the commands of the tools
# module hack/tools/kube-node, ~7 min cold), the runc shim
# for containerd 2.x (runc itself is Debian's, a dependency of containerd),
# and the CNI plugins for pod networking.
CNI_PLUGINS_VERSION=v1.9.1
if [ ! -f "$TOOLS/kube-node-$KUBE_VERSION/.done" ]; then
	log "building hack/tools/kube-node into $TOOLS/kube-node-$KUBE_VERSION"
	mkdir -p "$TOOLS/kube-node-$KUBE_VERSION/bin"
	(cd "$(dirname "$0")/tools/kube-node" &&
		GOFLAGS=-buildvcs=false CGO_ENABLED=0 go build -trimpath -ldflags "$kube_ldflags" -o "$TOOLS/kube-node-$KUBE_VERSION/bin/" ./cmd/... >&2)
	touch "$TOOLS/kube-node-$KUBE_VERSION/.done"
fi
go_tool "$TOOLS/containerd-shim-$CONTAINERD2_VERSION" \
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD2_VERSION"
go_tool "$TOOLS/cni-plugins-$CNI_PLUGINS_VERSION" \
	"github.com/containernetworking/plugins/plugins/main/bridge@$CNI_PLUGINS_VERSION" \
	"github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_PLUGINS_VERSION" \
	"github.com/containernetworking/plugins/plugins/main/loopback@$CNI_PLUGINS_VERSION"
# Cluster DNS for test/kube: CoreDNS with its kubernetes plugin only.
COREDNS_VERSION=v1.12.3
module_tool "$TOOLS/coredns-$COREDNS_VERSION" coredns

# helm, to install the operator chart the way users do (test/system, the
# demo).
HELM_VERSION=v3.22.0
go_tool "$TOOLS/helm-$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# Independent clients of the agent's registry (test/e2e/clients_test.go):
# the OCI distribution-spec conformance suite (pinned: the module proxy
# serves only some versions) and crane.
OCI_CONFORMANCE_VERSION=v0.0.0-20260831232431-97274622c111
go_tool "$TOOLS/oci-conformance-$OCI_CONFORMANCE_VERSION" \
	"github.com/opencontainers/distribution-spec/conformance@$OCI_CONFORMANCE_VERSION"
CRANE_VERSION=v0.22.1
go_tool "$TOOLS/crane-$CRANE_VERSION" "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"

echo "$TOOLS"
