#!/usr/bin/env bash
# The operator's main job, locally: a real kube-apiserver, the Azure emulator seeded with the
# demo fixture, the operator itself, and the manifests in examples/. It shows a grant going
# Active, its rule appearing in the emulator, then Expired with the rule gone.
#
#   scripts/demo.sh          start everything, apply examples/, watch one grant's life
#   scripts/demo.sh down     stop the operator, the emulator and the control plane
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEMO="$PWD/.demo"
# A control plane of the demo's own, so test runs and the demo never share objects.
export PORTCULLIS_CLUSTER_DIR="$DEMO/cluster"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
stop_pid() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null || true; rm -f "$1"; }

down() {
  stop_pid "$DEMO/operator.pid"
  stop_pid "$DEMO/emulator.pid"
  scripts/local-cluster.sh stop
}
if [ "${1:-}" = down ]; then down; exit 0; fi

mkdir -p "$DEMO"
stop_pid "$DEMO/operator.pid"; stop_pid "$DEMO/emulator.pid"

say "building the operator and the emulator"
cargo build --workspace --bins --locked

say "local control plane"
scripts/local-cluster.sh start
export KUBECONFIG="$PORTCULLIS_CLUSTER_DIR/kubeconfig"
kubectl apply -f crds/
kubectl wait --for condition=Established crd --all --timeout=60s >/dev/null

say "Azure emulator with emulator/fixtures/demo.yaml"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AZ="http://127.0.0.1:$port"
rm -f "$DEMO/emulator-state.json"
target/debug/portcullis-azure-emulator --listen "127.0.0.1:$port" --fixture emulator/fixtures/demo.yaml \
  --state-file "$DEMO/emulator-state.json" --async-delay-ms 300 --retry-after-secs 0 >"$DEMO/emulator.log" 2>&1 &
echo $! >"$DEMO/emulator.pid"
for _ in $(seq 1 100); do curl -fsS "$AZ/_emulator/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "$AZ/_emulator/health" >/dev/null || { cat "$DEMO/emulator.log"; exit 1; }
echo "ARM endpoint: $AZ"

say "operator with its admission webhook (log: .demo/operator.log)"
wport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AZURE_TENANT_ID=demo-tenant AZURE_CLIENT_ID=portcullis-demo AZURE_CLIENT_SECRET=demo-secret \
AZURE_AUTHORITY_HOST="$AZ/" PORTCULLIS_AZURE_ENDPOINT="$AZ" PORTCULLIS_RESYNC_SECONDS=30 \
PORTCULLIS_WEBHOOK_LISTEN="127.0.0.1:$wport" PORTCULLIS_WEBHOOK_CONFIGURATION_NAME=portcullis-demo \
  target/debug/portcullis run >"$DEMO/operator.log" 2>&1 &
echo $! >"$DEMO/operator.pid"

say "registering the webhooks (https://127.0.0.1:$wport; the operator patches in its CA)"
# As the chart registers them, but by URL: this API server runs outside any cluster network.
webhook() { # kind, webhook name, path
  cat <<YAML
apiVersion: admissionregistration.k8s.io/v1
kind: $1
metadata: { name: portcullis-demo }
webhooks:
  - name: $2
    clientConfig: { url: "https://127.0.0.1:$wport$3" }
    rules:
      - { apiGroups: [portcullis.dev], apiVersions: ["*"], operations: [CREATE, UPDATE], resources: [accessgrants, accessapprovals], scope: Namespaced }
    failurePolicy: Fail
    sideEffects: None
    admissionReviewVersions: [v1]
    timeoutSeconds: 10
YAML
}
{ webhook MutatingWebhookConfiguration mutate.portcullis.dev /mutate; echo ---
  webhook ValidatingWebhookConfiguration validate.portcullis.dev /validate; } | kubectl apply -f - >/dev/null
# Ready when a server-side dry run of a grant goes through both webhooks (CA patched, picked up).
for _ in $(seq 1 120); do
  kubectl apply --dry-run=server -f examples/accessgrant.yaml >/dev/null 2>&1 && break
  sleep 0.5
done
kubectl apply --dry-run=server -f examples/accessgrant.yaml >/dev/null || { tail -n 30 "$DEMO/operator.log"; exit 1; }
kubectl get mutatingwebhookconfigurations,validatingwebhookconfigurations portcullis-demo

say "applying examples/ (the Kubernetes manifests)"
# The namespace's JitScope first: until one names it, its policies are refused (OutOfScope).
kubectl apply -f examples/jitscope.yaml
for manifest in examples/*.yaml; do kubectl apply -f "$manifest"; done

nsg=/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-demo/providers/Microsoft.Network/networkSecurityGroups/nsg-vm1
show_rules() {
  curl -fsS "$AZ/_emulator/rules?nsg=$nsg" | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    p = r["properties"]
    ports = p.get("destinationPortRange") or ",".join(p.get("destinationPortRanges", []))
    src = p.get("sourceAddressPrefix") or ",".join(p.get("sourceAddressPrefixes", []))
    print("  %5s  %-5s %-8s %-40s port %-6s from %s" % (p["priority"], p["access"], p["direction"], r["name"], ports, src))'
}
wait_phase() {
  for _ in $(seq 1 ${2:-120}); do
    [ "$(kubectl get accessgrant alice-ssh-vm1 -o jsonpath='{.status.phase}')" = "$1" ] && return 0
    sleep 1
  done
  echo "grant did not reach $1; operator log:" >&2; tail -n 30 "$DEMO/operator.log" >&2; return 1
}

say "waiting for the grant to become Active with its rules open"
wait_phase Active
for _ in $(seq 1 60); do
  [ "$(kubectl get accessgrant alice-ssh-vm1 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] && break
  sleep 0.5
done
kubectl get jitpolicies,accessgrants
echo; echo "rules in nsg-vm1 (user rules untouched, Portcullis rules named portcullis-*):"; show_rules

say "waiting for the grant to expire (PT30S)"
wait_phase Expired 90
kubectl get accessgrants
echo; echo "rules in nsg-vm1 after expiry:"; show_rules

say "still running: KUBECONFIG=$KUBECONFIG, emulator $AZ; stop everything with: scripts/demo.sh down"
