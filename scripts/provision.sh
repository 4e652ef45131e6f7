#!/usr/bin/env bash
# The main job on the embedded default (no Kubernetes, simulated node on this machine).
# For now: start a software TPM and read its identity through the collection's module.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# mDNS queries default to every interface, as upstream; keep ours on this machine.
export KCRYPT_MDNS_INTERFACES=${KCRYPT_MDNS_INTERFACES:-127.0.0.1}
state=$(mktemp -d /tmp/kcrypt-demo.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; rm -rf "$state"; }
trap cleanup EXIT
swtpm_setup --tpm2 --tpmstate "$state" --create-ek-cert --pcr-banks sha256 >/dev/null
port=$(python -c 'import sys; sys.path.insert(0, "tests"); from support.swtpm import free_port_pair; print(free_port_pair())')
swtpm socket --tpm2 --tpmstate dir="$state" --server type=tcp,port="$port",bindaddr=127.0.0.1 \
  --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear &
pid=$!
sleep 0.3
ansible localhost -m kairos.kcrypt.kairos_tpm_hash -a "tpm_device=swtpm:host=127.0.0.1,port=$port pcrs=0,7,11"
