#!/usr/bin/env bash
# release-charts.sh VERSION REFS REGISTRY OUT: both charts packaged as
# VERSION into OUT and pushed to oci://REGISTRY/helm-charts, the operator
# chart's images: pinned to REFS (name=reference@digest lines, from
# `cmd/images --refs`). Only the packaged copy is pinned: the operator image
# carries helm-charts/, so digests written into the tree would change it.
# `make release` runs it, and test/system, so the release path is tested.
# Env: HELM (helm binary), PLAIN_HTTP=1 for a registry without TLS.
set -euo pipefail
version=${1:?usage: release-charts.sh VERSION REFS REGISTRY OUT}
refs=${2:?refs file}
registry=${3:?registry}
out=${4:?output folder}
helm=${HELM:-helm}
root=$(cd "$(dirname "$0")/.." && pwd)
plain=()
[[ -n ${PLAIN_HTTP:-} ]] && plain=(--plain-http)

rm -rf "$out/charts" && mkdir -p "$out/charts"
cp -r "$root/helm-charts/spegel" "$root/helm-charts/operator" "$out/charts/"
values=$out/charts/operator/values.yaml
while IFS='=' read -r name ref; do
  [[ -z $name ]] && continue
  grep -q "^  $name: " "$values" || { echo "release-charts: $values has no images.$name" >&2; exit 1; }
  sed -i -E "s#^  $name: .*#  $name: $ref#" "$values"
done <"$refs"
for c in spegel operator; do
  "$helm" package "$out/charts/$c" --version "$version" --app-version "$version" -d "$out"
done
for pkg in "$out/spegel-$version.tgz" "$out/fleetmirror-operator-$version.tgz"; do
  "$helm" push "$pkg" "oci://$registry/helm-charts" "${plain[@]}"
done
