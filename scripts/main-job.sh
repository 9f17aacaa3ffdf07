#!/usr/bin/env bash
# The main job (README): installs what the stack needs, builds squall, brings the real
# local stack up, runs a bounded produce/consume round trip through the proxies, prints
# what it measured (report in reports/<run>/), and stops the stack again, whatever happens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
cargo build --quiet -p squall
squall=target/debug/squall
run_dir="${SQUALL_RUN_DIR:-.squall/main-job}"

"$squall" stack up --run-dir "$run_dir"
trap '"$squall" stack down --run-dir "$run_dir"' EXIT
"$squall" stack status --run-dir "$run_dir" >/dev/null
"$squall" smoke --run-dir "$run_dir" --count "${SMOKE_COUNT:-5000}" --rate "${SMOKE_RATE:-1000}"
