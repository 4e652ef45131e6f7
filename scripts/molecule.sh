#!/usr/bin/env bash
# Runs every molecule scenario (extensions/molecule, docs/molecule.md) as `molecule test -s NAME`,
# KCRYPT_MOLECULE_JOBS (default 2) at a time, the longest first. Each scenario's output goes to a log
# that is printed whole once all have ended (no interleaving), then one line per scenario.
# Exits 1 if any scenario failed; the others still run (as --continue-on-failure did).
#
# Scenarios may run at the same time: everything one makes is its own (directory, lab name, network,
# port, service user, molecule's state directory), and lab nodes each have their own /run/cryptsetup
# and /run/lock (roles/lab, docs/lab.md), so the LUKS UUID all COS_PERSISTENT partitions share no
# longer makes one scenario's in-place encryption wait for (or be refused by) another's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
jobs=${KCRYPT_MOLECULE_JOBS:-2}

# longest first (docs/molecule.md, Timings), so the last to start are short; new scenarios go last
order=(rekey mdns quarantine_pcr registered_only default tofu static legacy offline)
scenarios=()
for name in "${order[@]}"; do
  [ -f "extensions/molecule/$name/molecule.yml" ] && scenarios+=("$name")
done
for file in extensions/molecule/*/molecule.yml; do
  name=$(basename "$(dirname "$file")")
  [[ " ${scenarios[*]} " == *" $name "* ]] || scenarios+=("$name")
done

logs=$(mktemp -d /tmp/molecule-logs.XXXXXX)
trap 'rm -rf "$logs"' EXIT

run() {  # one scenario: its output in $logs/NAME.log, "exit-code seconds" in $logs/NAME.result
  local name=$1 start rc=0
  start=$(date +%s)
  molecule test -s "$name" >"$logs/$name.log" 2>&1 || rc=$?
  echo "$rc $(( $(date +%s) - start ))" >"$logs/$name.result"
}

running=0
for name in "${scenarios[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n
    running=$((running - 1))
  fi
  run "$name" &
  running=$((running + 1))
done
wait

status=0
for name in "${scenarios[@]}"; do
  echo "--- molecule test -s $name"
  cat "$logs/$name.log"
done
echo "--- molecule: ${#scenarios[@]} scenarios, $jobs at a time"
for name in "${scenarios[@]}"; do
  read -r rc seconds <"$logs/$name.result" || { rc=missing seconds=?; }
  if [ "$rc" = 0 ]; then result=passed; else result="FAILED ($rc)"; status=1; fi
  printf '%-16s %-12s %s s\n' "$name" "$result" "$seconds"
done
exit $status
