#!/usr/bin/env bash
# Sets up this checkout on a Debian 12 machine: system packages, the Python virtualenv
# (.venv) with every dependency, and the collection link Ansible uses in place.
# Idempotent; safe to re-run. Caches the tpm2-pytss wheel under $KCRYPT_CACHE
# (default ~/.cache/kcrypt) but works without it.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${KCRYPT_CACHE:-$HOME/.cache/kcrypt}
PYTHON=${PYTHON:-python3}

DEBS=(swtpm swtpm-tools tpm2-tools libtss2-dev cryptsetup-bin cryptsetup e2fsprogs util-linux fdisk gdisk
      iproute2 openssl gcc pkg-config python3-dev tang curl rsync
      qemu-system-x86 cpio kmod)  # the VM tests (tests/vm, docs/vm.md): QEMU, initramfs packing, depmod
missing=()
for p in "${DEBS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pip, without the machine's notes about unreachable extra indexes; fails when pip fails.
pip() {
  .venv/bin/python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip install -q --upgrade pip wheel
mkdir -p "$CACHE/wheels"
if ! ls "$CACHE"/wheels/tpm2_pytss-3.0.0-*.whl >/dev/null 2>&1; then
  echo "setup: building the tpm2-pytss wheel (~30 s, cached in $CACHE/wheels)"
  pip wheel -q --no-deps -w "$CACHE/wheels" tpm2-pytss==3.0.0
fi
pip install -q --find-links "$CACHE/wheels" -r requirements-dev.txt

mkdir -p .collections/ansible_collections/kairos
ln -sfn ../../.. .collections/ansible_collections/kairos/kcrypt
echo "setup: done ($(.venv/bin/ansible --version | sed -n 1p))"
