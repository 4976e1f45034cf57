#!/usr/bin/env bash
# A real local Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1.
#
#   scripts/local-cluster.sh install   build/extract the binaries if they are not cached yet
#   scripts/local-cluster.sh start     install, then start etcd + apiserver on free ports
#   scripts/local-cluster.sh stop      stop what `start` started (by recorded PID)
#   scripts/local-cluster.sh env       print `export KUBECONFIG=...` for the running cluster
#
# Binaries are cached in $PORTCULLIS_CACHE (default ~/.cache/portcullis); the running cluster's
# state (certs, kubeconfig, PIDs, logs, etcd data) lives in $PORTCULLIS_CLUSTER_DIR
# (default <repo>/.local-cluster). See ../shared/local-control-plane.md for why it is built this way.
set -euo pipefail

CACHE="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
BIN="$CACHE/bin"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PORTCULLIS_CLUSTER_DIR:-$REPO/.local-cluster}"
K8S_SOURCE_VERSION="${PORTCULLIS_K8S_SOURCE_VERSION:-}"

log() { printf '[local-cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

apt_updated=""
apt_update_once() {
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
  fi
}

sudo_maybe() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# A private apt configuration with deb-src entries derived from the machine's own deb entries,
# so no mirror address is written into the repository and /etc/apt stays untouched.
private_apt_opts() {
  local dir="$1"
  mkdir -p "$dir/sources.d" "$dir/lists/partial" "$dir/cache/archives/partial"
  local src
  for src in /etc/apt/sources.list.d/*.sources; do
    [ -e "$src" ] || continue
    sed -e 's/^Types:.*/Types: deb-src/' "$src" >"$dir/sources.d/$(basename "$src")"
  done
  if [ -f /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed -e 's/^deb /deb-src /' >"$dir/sources.d/legacy.list" || true
  fi
  [ -n "$(ls -A "$dir/sources.d")" ] || die "no apt sources found under /etc/apt to derive deb-src entries from"
  echo "-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$dir/sources.d -o Dir::State::Lists=$dir/lists -o Dir::Cache=$dir/cache"
}

install_etcd() {
  [ -x "$BIN/etcd" ] && return 0
  log "extracting etcd from Debian's etcd-server package"
  apt_update_once
  local tmp; tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -q etcd-server >&2)
  dpkg-deb -x "$tmp"/etcd-server_*.deb "$tmp/root"
  mkdir -p "$BIN"
  install -m 0755 "$tmp/root/usr/bin/etcd" "$BIN/etcd"
  rm -rf "$tmp"
}

install_apiserver() {
  [ -x "$BIN/kube-apiserver" ] && return 0
  local started; started=$(date +%s)
  log "kube-apiserver not cached in $BIN: building it from Debian's kubernetes source package (about 10 minutes on 2 cores)"
  apt_update_once
  sudo_maybe env DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-1.19-go dpkg-dev make rsync \
    golang-github-modern-go-reflect2-dev >&2
  local work="$CACHE/build"
  rm -rf "$work"; mkdir -p "$work"
  local opts; opts="$(private_apt_opts "$work/apt")"
  log "fetching the deb-src index"
  # shellcheck disable=SC2086
  apt-get $opts update -qq >&2
  log "downloading the kubernetes source package"
  local pkg="kubernetes"
  [ -n "$K8S_SOURCE_VERSION" ] && pkg="kubernetes=$K8S_SOURCE_VERSION"
  # shellcheck disable=SC2086
  (cd "$work" && apt-get $opts source --download-only -q "$pkg" >&2)
  log "unpacking"
  (cd "$work" && dpkg-source -x --skip-patches ./kubernetes_*.dsc src >/dev/null) \
    || (cd "$work" && rm -rf src && dpkg-source -x ./kubernetes_*.dsc src >/dev/null)
  local src="$work/src"
  [ -d "$src/vendor/github.com/modern-go/reflect2" ] || die "unexpected source layout: no vendored reflect2"
  log "replacing vendored modern-go/reflect2 1.0.1 (broken on Go >= 1.18) with Debian's 1.0.2"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  rm -rf "$src/vendor/github.com/modern-go/reflect2/.git" "$src/vendor/github.com/modern-go/reflect2/"*_test.go
  log "building cmd/kube-apiserver (progress dots every 30 s)"
  (while sleep 30; do printf '.' >&2; done) &
  local ticker=$!
  local rc=0
  (cd "$src" && PATH="/usr/lib/go-1.19/bin:$PATH" CGO_ENABLED=0 GOCACHE="$work/gocache" GOPATH="$work/gopath" \
    GOFLAGS=-mod=vendor make WHAT="cmd/kube-apiserver" >"$work/build.log" 2>&1) || rc=$?
  kill "$ticker" 2>/dev/null || true
  printf '\n' >&2
  if [ "$rc" != 0 ]; then
    tail -n 40 "$work/build.log" >&2
    die "kube-apiserver build failed (full log: $work/build.log)"
  fi
  local out; out="$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n 1)"
  [ -n "$out" ] || die "build finished but no kube-apiserver binary was found under $src/_output"
  mkdir -p "$BIN"
  install -m 0755 "$out" "$BIN/kube-apiserver"
  rm -rf "$work"
  log "kube-apiserver built in $(( $(date +%s) - started )) s"
}

cmd_install() {
  install_etcd
  install_apiserver
  command -v openssl >/dev/null || die "openssl is required"
  command -v kubectl >/dev/null || { apt_update_once; sudo_maybe apt-get install -y -q kubernetes-client >&2; }
  log "binaries ready in $BIN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

is_running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

make_certs() {
  local d="$STATE/pki"
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=portcullis-local-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$d/apiserver.key" -out "$d/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$d/apiserver.ext"
  openssl x509 -req -in "$d/apiserver.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/apiserver.ext" -out "$d/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  local token; token="$(openssl rand -hex 24)"
  printf '%s,admin,admin,"system:masters"\n' "$token" >"$d/tokens.csv"
  echo "$token" >"$d/admin.token"
}

cmd_start() {
  cmd_install
  if is_running "$STATE/apiserver.pid"; then
    log "already running; kubeconfig: $STATE/kubeconfig"
    return 0
  fi
  rm -rf "$STATE"; mkdir -p "$STATE"
  make_certs
  local etcd_port etcd_peer api_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
  log "starting etcd on 127.0.0.1:$etcd_port"
  "$BIN/etcd" --name portcullis --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "portcullis=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync >"$STATE/etcd.log" 2>&1 &
  echo $! >"$STATE/etcd.pid"
  log "starting kube-apiserver on 127.0.0.1:$api_port"
  local d="$STATE/pki"
  "$BIN/kube-apiserver" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --insecure-port 0 --etcd-servers "http://127.0.0.1:$etcd_port" \
    --tls-cert-file "$d/apiserver.crt" --tls-private-key-file "$d/apiserver.key" --client-ca-file "$d/ca.crt" \
    --token-auth-file "$d/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$d/sa.pub" \
    --service-account-signing-key-file "$d/sa.key" --service-cluster-ip-range 10.96.0.0/24 \
    --disable-admission-plugins ServiceAccount --endpoint-reconciler-type none \
    --cert-dir "$STATE/apiserver-certs" >"$STATE/apiserver.log" 2>&1 &
  echo $! >"$STATE/apiserver.pid"
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $d/ca.crt
users:
- name: admin
  user:
    token: $(cat "$d/admin.token")
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
EOF
  local deadline=$(( $(date +%s) + 60 ))
  until curl -fsS --cacert "$d/ca.crt" -H "Authorization: Bearer $(cat "$d/admin.token")" \
      "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; do
    if ! is_running "$STATE/apiserver.pid"; then tail -n 30 "$STATE/apiserver.log" >&2; die "kube-apiserver exited"; fi
    if ! is_running "$STATE/etcd.pid"; then tail -n 30 "$STATE/etcd.log" >&2; die "etcd exited"; fi
    [ "$(date +%s)" -lt "$deadline" ] || { tail -n 30 "$STATE/apiserver.log" >&2; die "kube-apiserver not ready within 60 s"; }
    sleep 0.5
  done
  log "ready: export KUBECONFIG=$STATE/kubeconfig"
}

stop_pid() {
  local f="$1"
  if is_running "$f"; then
    local pid; pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_stop() {
  stop_pid "$STATE/apiserver.pid"
  stop_pid "$STATE/etcd.pid"
  log "stopped"
}

cmd_env() {
  [ -f "$STATE/kubeconfig" ] || die "no cluster state in $STATE; run '$0 start' first"
  echo "export KUBECONFIG=$STATE/kubeconfig"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
