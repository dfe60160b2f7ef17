# fleetmirror's images, for builders with a Docker daemon or BuildKit:
#   docker build                   --build-arg VERSION=v0.1.0 -t ghcr.io/fleetmirror/agent:v0.1.0 .
#   docker build --target operator --build-arg VERSION=v0.1.0 -t ghcr.io/fleetmirror/operator:v0.1.0 .
# `make images` builds the same layout without a daemon (cmd/images), with
# reproducible layers; that is what releases use. The build stage's image
# is the one pinned in mirror-images/golang (refresh its digest there).
ARG GO_IMAGE=docker.io/library/golang:1.26.8-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${GO_IMAGE} AS build
ARG VERSION=dev
ARG TARGETOS=linux
ARG TARGETARCH=amd64
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ENV CGO_ENABLED=0 GOFLAGS=-buildvcs=false
RUN for cmd in agent operator mirror-images; do \
      GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath \
        -ldflags "-s -w -X github.com/fleetmirror/fleetmirror/agent/version.Version=${VERSION}" \
        -o /out/usr/local/bin/$cmd ./cmd/$cmd || exit 1; \
    done
# The minimal runtime: users (65532 is nonroot) and a writable /tmp, where
# the agent verifies blobs fetched from peers.
RUN mkdir -p /rootfs/etc /rootfs/tmp /rootfs/home/nonroot && chmod 1777 /rootfs/tmp && \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >/rootfs/etc/passwd && \
    printf 'root:x:0:\nnonroot:x:65532:\n' >/rootfs/etc/group

FROM scratch AS runtime
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin TMPDIR=/tmp
LABEL org.opencontainers.image.source="https://github.com/fleetmirror/fleetmirror" \
      org.opencontainers.image.licenses="Apache-2.0"
# Non-root by default. The containerd-prep DaemonSet edits the host's
# containerd config and restarts containerd, so its pod sets runAsUser: 0.
USER 65532:65532

# The release tool, for pipelines that run it as a container.
FROM runtime AS mirror-images
# It talks to registries over TLS: the build image's CA bundle.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/usr/local/bin/mirror-images /usr/local/bin/mirror-images
ENTRYPOINT ["/usr/local/bin/mirror-images"]

# The operator, with the charts and watches.yaml where it reads them.
FROM runtime AS operator
ARG VERSION=dev
LABEL org.opencontainers.image.title="fleetmirror operator" org.opencontainers.image.version="${VERSION}"
WORKDIR /opt/helm
COPY --from=build /out/usr/local/bin/operator /usr/local/bin/operator
COPY helm-charts/ /opt/helm/helm-charts/
COPY watches.yaml /opt/helm/watches.yaml
ENTRYPOINT ["/usr/local/bin/operator"]

# The agent: `agent mirror` on every node; `agent prep` and the keepalive
# of the containerd-prep DaemonSet run from this same image.
FROM runtime AS agent
ARG VERSION=dev
LABEL org.opencontainers.image.title="fleetmirror agent" org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/usr/local/bin/agent /usr/local/bin/agent
ENTRYPOINT ["/usr/local/bin/agent"]
