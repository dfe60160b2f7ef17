#!/usr/bin/env bash
# Fails when a legacy registry path appears outside the checks that forbid
# it: those registries are gone, and an image path there breaks every node.
set -euo pipefail
cd "$(dirname "$0")/.."
pattern='k8s\.gcr\.io|gcr\.io/google[-_]containers'
hits=$(git grep -nE "$pattern" -- . ':!hack/legacy-registries.sh' ':!*_test.go' 2>/dev/null || true)
if [ -n "$hits" ]; then
	echo "legacy registry path found; use registry.k8s.io instead:" >&2
	echo "$hits" >&2
	exit 1
fi
