#!/usr/bin/env bash
# The project's whole test run: unit + integration tests (real swtpm, cryptsetup, SQLite, zeroconf, kmock),
# the VM tests (a real kernel with dm-crypt under QEMU), the molecule scenarios,
# ansible-test sanity, ansible-lint (production profile) and the changelog lint.
# Run ./scripts/setup.sh once first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# mDNS queries default to every interface, as upstream; keep ours on this machine.
export KCRYPT_MDNS_INTERFACES=${KCRYPT_MDNS_INTERFACES:-127.0.0.1}
status=0
step() { echo; echo "=== $*"; }

step "pytest"
# loadscope: a test class (a lab, a deployment built up step by step) stays on one worker, in order.
# (loadgroup would be finer, but with pytest 9 xdist 3.8 no longer applies xdist_group marks.)
# --no-loadscope-reorder: classes and modules start in collection order, where tests/conftest.py puts
# the ones marked slow first, longest first (xdist's default order, by test count, started them last).
python -m pytest -n "${KCRYPT_TEST_WORKERS:-3}" --dist loadscope --no-loadscope-reorder -q --durations=25 "$@" \
  || status=1  # the slowest tests, to keep CI under 40 min

if [ "${KCRYPT_VM_TESTS:-1}" = 1 ]; then  # KCRYPT_VM_TESTS=0 skips them (~5 min on 2 cores)
  step "VM tests (QEMU TCG + swtpm: real dm-crypt, docs/vm.md)"
  python -m pytest -n "${KCRYPT_VM_WORKERS:-2}" -q tests/vm || status=1  # one TCG VM per core
fi

if [ "${KCRYPT_MOLECULE:-1}" = 1 ]; then  # KCRYPT_MOLECULE=0 skips them
  step "molecule test, every scenario, ${KCRYPT_MOLECULE_JOBS:-2} at a time (extensions/molecule: lab + challenger + node role, docs/molecule.md)"
  ./scripts/molecule.sh || status=1
fi

step "ansible-test sanity"
./scripts/sanity.sh >/tmp/kcrypt-sanity.log 2>&1 || { grep -E "^(ERROR|FATAL)" /tmp/kcrypt-sanity.log; status=1; }
grep -E "^(ERROR|FATAL)" /tmp/kcrypt-sanity.log || echo "sanity: clean"
# Modules run on managed nodes with other Pythons: compile and import checks on each of these.
# Debian 12 ships only 3.11; the others come from pyenv in the build machine's image (~/.pyenv/versions),
# as scripts/sanity.sh puts them on PATH. No reachable registry offers CPython builds, so a machine
# without one skips it, and says so; KCRYPT_SANITY_PYTHONS_REQUIRED=1 (.ci/run) makes that a failure.
python_for() {  # a working interpreter of version $1, or nothing
  local py
  for py in "$HOME"/.pyenv/versions/"$1".*/bin/python"$1" "$(command -v "python$1" || true)"; do
    [ -x "$py" ] && [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$1" ] \
      && { echo "$py"; return; }
  done
}
checked=() skipped=()
for v in ${KCRYPT_SANITY_PYTHONS:-3.9 3.10 3.12 3.13}; do
  py=$(python_for "$v")
  if [ -z "$py" ]; then
    skipped+=("$v (no working python$v in ~/.pyenv/versions or on PATH)")
    continue
  fi
  SANITY_PYTHON=$v ./scripts/sanity.sh --test compile --test import >/tmp/kcrypt-sanity-$v.log 2>&1 \
    || { grep -E "^(ERROR|FATAL)" /tmp/kcrypt-sanity-$v.log; status=1; }
  result=$(grep -qE '^(ERROR|FATAL)' /tmp/kcrypt-sanity-$v.log && echo FAILED || echo clean)
  echo "sanity compile+import on Python $v ($py): $result"
  checked+=("$v")
done
echo "sanity compile+import: checked ${checked[*]:-none} (and 3.11 above); skipped ${skipped[*]:-none}"
if [ ${#skipped[@]} -gt 0 ] && [ "${KCRYPT_SANITY_PYTHONS_REQUIRED:-0}" = 1 ]; then
  echo "sanity: Python versions missing and KCRYPT_SANITY_PYTHONS_REQUIRED=1" >&2
  status=1
fi

step "ansible-lint (production profile)"
ansible-lint -q || status=1

step "changelog fragments"
antsibull-changelog lint || status=1

exit $status
