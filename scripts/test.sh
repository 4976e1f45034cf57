#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). On a fresh machine it
# installs what the tests need (the local control plane is built once and cached), starts a
# private kube-apiserver for this run, and stops it afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "tool check"
command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

# Incremental caches only help a developer's rebuilds; in a one-shot run they double the disk used.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "local control plane (etcd + kube-apiserver)"
PORTCULLIS_CLUSTER_DIR="$(mktemp -d "${TMPDIR:-/tmp}/portcullis-test-cluster.XXXXXX")"
export PORTCULLIS_CLUSTER_DIR
cleanup() { scripts/local-cluster.sh stop || true; rm -rf "$PORTCULLIS_CLUSTER_DIR"; }
trap cleanup EXIT
scripts/local-cluster.sh start
export KUBECONFIG="$PORTCULLIS_CLUSTER_DIR/kubeconfig"

# Azure's REST specifications, replayed by the emulator's conformance tests.
export AZURE_REST_API_SPECS="${AZURE_REST_API_SPECS:-$PWD/../shared/azure-rest-api-specs}"

step "cargo test (unit, property, integration against the API server and the Azure emulator)"
cargo test --workspace --locked
