#!/usr/bin/env bash
# The main job on the embedded default (no Kubernetes): build a lab of simulated nodes on this
# machine (swtpm + loop disk each), deploy the KMS (challenger), register and encrypt every node with
# playbooks/provision.yml, show the summary, then remove the KMS and the lab again.
#   KCRYPT_LAB_NODES=3      how many nodes
#   KCRYPT_KEEP_LAB=1       keep the lab and the KMS (prints how to remove them)
#   KCRYPT_LAB_DIR=DIR      use (and keep reusing) this lab directory instead of a fresh one
#   KCRYPT_PROVISION_AGAIN=0  skip the second run (which shows that nothing changes)
# Extra arguments go to ansible-playbook (e.g. --check --diff, -e node_key_source=tpm). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# mDNS queries default to every interface, as upstream; keep ours on this machine.
export KCRYPT_MDNS_INTERFACES=${KCRYPT_MDNS_INTERFACES:-127.0.0.1}
[ "$(id -u)" -eq 0 ] || { echo "provision.sh: run as root (loop devices, swtpm, cryptsetup)" >&2; exit 1; }

nodes=${KCRYPT_LAB_NODES:-3}
lab=${KCRYPT_LAB_DIR:-$(mktemp -d /tmp/kcrypt-lab.XXXXXX)}
inventory="$lab/inventory.yml"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
lab_vars=(-e "lab_dir=$lab" -e "lab_inventory_path=$inventory")

teardown() {
  if [ "${KCRYPT_KEEP_LAB:-0}" = 1 ]; then
    echo "provision.sh: kept the lab and its KMS in $lab (inventory $inventory). Remove both with:"
    echo "  ansible-playbook playbooks/lab_down.yml ${lab_vars[*]}"
    return
  fi
  echo "provision.sh: removing the lab and its KMS in $lab"
  ansible-playbook playbooks/lab_down.yml "${lab_vars[@]}" >/dev/null || echo "provision.sh: lab_down failed" >&2
  [ -n "${KCRYPT_LAB_DIR:-}" ] || rm -rf "$lab"
}
trap teardown EXIT

echo "provision.sh: building a lab of $nodes nodes in $lab"
ansible-playbook playbooks/lab_up.yml "${lab_vars[@]}" -e "lab_node_count=$nodes" >/dev/null
echo "provision.sh: running playbooks/provision.yml (KMS at http://127.0.0.1:$port)"
SECONDS=0
set +e
ansible-playbook playbooks/provision.yml -i "$inventory" -e "challenger_port=$port" "$@"
rc=$?
set -e
echo "provision.sh: provision.yml took ${SECONDS} s (exit $rc)"
if [ "$rc" -eq 0 ] && [ "${KCRYPT_PROVISION_AGAIN:-1}" = 1 ]; then
  # the same job again must change nothing (PLAY RECAP: changed=0 everywhere)
  echo "provision.sh: running provision.yml again (expect changed=0)"
  SECONDS=0
  set +e
  ansible-playbook playbooks/provision.yml -i "$inventory" -e "challenger_port=$port" "$@" > "$lab/again.log"
  rc=$?
  set -e
  sed -n -e '/^TASK \[Summary/,/^PLAY \[Fail/{/^PLAY \[Fail/!p}' -e '/^PLAY RECAP/,$p' "$lab/again.log"
  echo "provision.sh: second run took ${SECONDS} s (exit $rc)"
fi
exit $rc
