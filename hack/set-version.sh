#!/usr/bin/env bash
# set-version.sh X.Y.Z: the release version, written where it lives
# (VERSION) and where the charts must repeat it (Chart.yaml version and
# appVersion, the operator chart's default image tags).
# `go test ./release/version` fails while they disagree. The chart goldens
# carry the version too: go test ./test/operator -run TestChartGolden -update.
set -euo pipefail
v=${1:?usage: hack/set-version.sh X.Y.Z}
[[ $v =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] || { echo "set-version: $v is not X.Y.Z (no leading v)" >&2; exit 2; }
cd "$(dirname "$0")/.."
printf '%s\n' "$v" >VERSION
for c in helm-charts/spegel helm-charts/operator; do
  sed -i -E "s/^version: .*/version: $v/; s/^appVersion: .*/appVersion: \"$v\"/" "$c/Chart.yaml"
done
sed -i -E "s#^(  (agent|operator): ghcr.io/fleetmirror/(agent|operator)):.*#\1:$v#" helm-charts/operator/values.yaml
go test -count=1 ./release/version
