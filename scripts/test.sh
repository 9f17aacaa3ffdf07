#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the stack needs, checks formatting and
# lints, then runs every test, unit and real-stack integration tests alike. The real-stack
# tests start their own stack (ports from SQUALL_TEST_BASE_PORT, default 29400..29699)
# and stop it by pid when they end. The output ends with the test runner's summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$(date +%s)
scripts/install-deps.sh
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy --all-targets -D warnings" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "[test] cargo test (setup took $(( $(date +%s) - started )) s)" >&2
exec cargo test --workspace --no-fail-fast
