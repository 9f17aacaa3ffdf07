#!/usr/bin/env bash
# Runs every chaos scenario (scenarios/chaos/*.yaml, or the files given) against one
# local stack started once, and prints a table: scenario, exit code, verdicts, run dir.
# Exit 0 when every scenario passed. The stack is stopped whatever happens.
#   scripts/chaos.sh                          # all of them
#   scripts/chaos.sh scenarios/chaos/node-kill.yaml
#   SQUALL_BASE_PORT=31000 scripts/chaos.sh   # another port plan
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
cargo build --release --quiet -p squall -p chatstream
squall=target/release/squall
stack_dir="${SQUALL_CHAOS_STACK:-.squall/chaos-stack}"
base="${SQUALL_BASE_PORT:-29000}"
"$squall" stack up --run-dir "$stack_dir" --base-port "$base"
trap '"$squall" stack down --run-dir "$stack_dir"' EXIT

files=("$@")
[ "${#files[@]}" -gt 0 ] || files=(scenarios/chaos/*.yaml)
results=()
failed=0
for f in "${files[@]}"; do
  log="$(mktemp)"
  set +e
  "$squall" run --quiet --stack-dir "$stack_dir" "$f" >"$log" 2>&1
  code=$?
  set -e
  [ "$code" -eq 0 ] || failed=1
  verdicts="$(grep -E '^    (pass|FAIL|UNKNOWN) ' "$log" | awk '{print $1}' | sort | uniq -c | tr -s ' ' | paste -sd, -)"
  dir="$(grep -oE 'files +[^ ]+' "$log" | awk '{print $2}' | tail -1)"
  results+=("$(basename "$f" .yaml)|$code|${verdicts:-none}|${dir:-?}")
  echo "[chaos] $(basename "$f"): exit $code (${verdicts:-no verdicts}) ${dir}" >&2
  [ "$code" -eq 0 ] || tail -30 "$log" >&2
  rm -f "$log"
  # Leave the stack whole for the next scenario.
  "$squall" stack heal --run-dir "$stack_dir" >/dev/null
done
printf '\n%-22s %-5s %-28s %s\n' scenario exit verdicts "run directory"
for r in "${results[@]}"; do IFS='|' read -r n c v d <<<"$r"; printf '%-22s %-5s %-28s %s\n' "$n" "$c" "$v" "$d"; done
exit "$failed"
