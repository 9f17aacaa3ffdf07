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
# The docker provider (cargo feature `docker`, off by default) is compiled, linted and
# tested in the same passes as the rest: one feature set for the whole workspace costs one
# build, where a second pass with the feature would rebuild the crates that depend on it.
# Its test (harness/stack/tests/docker.rs) says it was skipped where no Docker engine answers.
features="squall/docker,squall-stack/docker"
echo "[test] cargo clippy --all-targets --features $features -D warnings" >&2
cargo clippy --workspace --all-targets --features "$features" --quiet -- -D warnings
echo "[test] cargo test (setup took $(( $(date +%s) - started )) s)" >&2
exec cargo test --workspace --features "$features" --no-fail-fast
