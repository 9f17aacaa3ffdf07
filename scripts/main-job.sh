#!/usr/bin/env bash
# The main job (README): installs what the stack needs, builds squall and chatstream
# (release), and runs the `smoke` scenario end to end: squall starts the real local stack
# (three KRaft Kafka brokers, Redis, PostgreSQL, Toxiproxy), three chatstream nodes and
# the workers, drives a minute of chat, stream and HTTP load, records the history, stops
# everything it started, and prints the headline figures and where the run's files are
# (reports/smoke-<timestamp>/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
echo "[main-job] cargo build --release -p squall -p chatstream" >&2
cargo build --release --quiet -p squall -p chatstream
exec target/release/squall run "${SQUALL_SCENARIO:-scenarios/smoke.yaml}" "$@"
