#!/usr/bin/env bash
# Load-generator efficiency, side by side on one node: squall (scenarios/bench/loadgen.yaml)
# and Gatling 3.14 (harness/gatling, squall.ChatSimulation) offer the same chat load
# (users, total rate, message size, conversations of the same size, duration) to the same
# chatstream node, one after the other. For each tool this script measures the tool's own
# process (not the node, not Maven): CPU time (user+sys, exact, from the wrapping shell's
# `times`), its CPU during the load window (sampled from /proc every 0.2 s), and its peak
# RSS (max over samples of VmRSS summed over its process tree, and VmHWM); then prints a
# table with messages acked per CPU-second and RSS per simulated user, and the ratios,
# and writes it to reports/loadgen-compare-<timestamp>.md.
#
#   scripts/loadgen-compare.sh                       # 1,000 users, 2,000 msg/s, 200 B, 60 s
#   scripts/loadgen-compare.sh --users 100 --rate 200 --duration 20 --only gatling
#
# Options (each also as an environment variable):
#   --users N        LOADGEN_USERS     simulated users, one WebSocket each     (1000)
#   --rate R         LOADGEN_RATE      chat messages per second, all users      (2000)
#   --bytes B        LOADGEN_BYTES     message body size                        (200)
#   --duration S     LOADGEN_DURATION  seconds of load                          (60)
#   --members M      LOADGEN_MEMBERS   members per conversation                 (4)
#   --only TOOL      LOADGEN_ONLY      squall | gatling | both                  (both)
#   --base-port P    LOADGEN_BASE_PORT the stack's base port; the node is P+101 (31300; the
#                    stack takes P..P+61 and the node P+101: keep them below the kernel's
#                    ephemeral range, 32768 and up, where a client socket may already sit)
#   --steady-skip S  LOADGEN_STEADY_SKIP seconds after the first send left out of the steady
#                    window (JIT warm-up, connection set-up)                 (10)
#   --no-build       LOADGEN_NO_BUILD=1  use the binaries in target/release as they are
#   --bin-dir DIR    LOADGEN_BIN_DIR     take squall and chatstream from DIR (implies --no-build)
#   --squall-bin F / --chatstream-bin F  (LOADGEN_SQUALL_BIN / LOADGEN_CHATSTREAM_BIN) one binary
#                    from elsewhere (implies --no-build)
#   --keep           LOADGEN_KEEP=1      keep the work directory (.squall/loadgen-compare-*)
#   --squall-b F     LOADGEN_SQUALL_B    an A/B of squall: a second squall binary (or a wrapper
#                    script that execs one with other options or environment) run against the
#                    same node, alternating with the first (A B A B ...); the report gives
#                    each run and the medians' ratio B / A
#   --rounds N       LOADGEN_ROUNDS      squall runs per binary (alternating with B)  (1)
#
# It starts the local stack (`squall stack up`, 3 Kafka brokers, Redis, PostgreSQL,
# Toxiproxy) and ONE chatstream node (release build, outbox publishing, Redis fan-out,
# default rate limits) and drives that node with both tools: squall through
# `squall run --target` (so squall starts nothing and only its own process is measured),
# Gatling as the JVM the gatling-maven-plugin would fork (same main class, same default
# JVM options), started directly so Maven's own JVM is not counted. Everything it started
# is stopped on exit (by pid / process group). Exit code: 0 done, 1 a tool failed,
# 2 could not run.
#
# Choose a rate the node sustains on the machine (the "achieved" column tells: squall keeps
# its schedule whatever the node does, Gatling's users wait for each ack and fall behind),
# and run it on an otherwise idle machine: the node, the stack and both tools share its
# cores, and a starved node slows Gatling's closed-per-user load.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

USERS=${LOADGEN_USERS:-1000}
RATE=${LOADGEN_RATE:-2000}
BYTES=${LOADGEN_BYTES:-200}
DURATION=${LOADGEN_DURATION:-60}
MEMBERS=${LOADGEN_MEMBERS:-4}
ONLY=${LOADGEN_ONLY:-both}
BASE_PORT=${LOADGEN_BASE_PORT:-31300}
STEADY_SKIP=${LOADGEN_STEADY_SKIP:-10}
NO_BUILD=${LOADGEN_NO_BUILD:-0}
KEEP=${LOADGEN_KEEP:-0}
BIN_DIR=${LOADGEN_BIN_DIR:-}
SQUALL_BIN=${LOADGEN_SQUALL_BIN:-}
CHATSTREAM_BIN=${LOADGEN_CHATSTREAM_BIN:-}
SQUALL_B=${LOADGEN_SQUALL_B:-}
ROUNDS=${LOADGEN_ROUNDS:-1}

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --users) USERS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --bytes) BYTES=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --members) MEMBERS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --base-port) BASE_PORT=$2; shift 2 ;;
    --steady-skip) STEADY_SKIP=$2; shift 2 ;;
    --no-build) NO_BUILD=1; shift ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --squall-bin) SQUALL_BIN=$2; shift 2 ;;
    --chatstream-bin) CHATSTREAM_BIN=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --squall-b) SQUALL_B=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "loadgen-compare: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $STEADY_SKIP =~ ^[0-9]+$ ]] || { echo "loadgen-compare: steady-skip must be a whole number of seconds" >&2; exit 2; }
if [ "$STEADY_SKIP" -ge "$DURATION" ]; then
  echo "loadgen-compare: steady-skip ($STEADY_SKIP) must be shorter than the duration ($DURATION)" >&2; exit 2
fi
for v in USERS RATE BYTES DURATION MEMBERS BASE_PORT ROUNDS; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -le 0 ]; then
    echo "loadgen-compare: ${v,,} must be a positive integer, got '${!v}'" >&2; exit 2
  fi
done
case $ONLY in squall|gatling|both) ;; *) echo "loadgen-compare: --only squall|gatling|both" >&2; exit 2 ;; esac
if [ "$MEMBERS" -gt "$USERS" ]; then MEMBERS=$USERS; fi
CONVS=$(( USERS / MEMBERS ))
NODE_PORT=$(( BASE_PORT + 101 ))
NODE_URL="http://127.0.0.1:$NODE_PORT"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
WORK="$ROOT/.squall/loadgen-compare-$STAMP"
REPORT="$ROOT/reports/loadgen-compare-$STAMP.md"
if [ -n "$BIN_DIR" ]; then
  BIN_DIR=$(cd "$BIN_DIR" && pwd) || exit 2
  NO_BUILD=1
else
  BIN_DIR="$ROOT/target/release"
fi
SQUALL="$BIN_DIR/squall"
CHATSTREAM="$BIN_DIR/chatstream"
if [ -n "$SQUALL_BIN" ]; then SQUALL=$(realpath "$SQUALL_BIN"); NO_BUILD=1; fi
if [ -n "$CHATSTREAM_BIN" ]; then CHATSTREAM=$(realpath "$CHATSTREAM_BIN"); NO_BUILD=1; fi
if [ -n "$SQUALL_B" ]; then
  SQUALL_B=$(realpath "$SQUALL_B")
  [ -x "$SQUALL_B" ] || { echo "loadgen-compare: --squall-b $SQUALL_B is not executable" >&2; exit 2; }
  [ "$ONLY" = gatling ] && { echo "loadgen-compare: --squall-b needs squall runs (--only squall or both)" >&2; exit 2; }
fi
GATLING_DIR="$ROOT/harness/gatling"
TICKS=$(getconf CLK_TCK)
mkdir -p "$WORK" "$ROOT/reports"

log() { printf '[loadgen-compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# ---------------------------------------------------------------- clean-up
STACK_STARTED=0
NODE_PID=
TOOL_PGID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$TOOL_PGID" ] && kill -0 "$TOOL_PGID" 2>/dev/null; then
    log "stopping the running tool (process group $TOOL_PGID)"
    kill -TERM -- "-$TOOL_PGID" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-$TOOL_PGID" 2>/dev/null || true
  fi
  if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
    log "stopping chatstream node (pid $NODE_PID)"
    kill -TERM "$NODE_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$NODE_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$NODE_PID" 2>/dev/null || true
  fi
  if [ "$STACK_STARTED" = 1 ]; then
    log "stopping the stack"
    "$SQUALL" stack --run-dir "$WORK/stack" down >"$WORK/stack-down.log" 2>&1 \
      || log "stack down failed: see $WORK/stack-down.log"
  fi
  if [ "$KEEP" = 1 ] || [ $rc -ne 0 ]; then
    log "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- build
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required ($2)"; }
need java "Java 17"
need mvn "Maven 3.8+"
need curl "curl"
need jq "jq"
need zcat "gzip"
if [ "$NO_BUILD" != 1 ]; then
  log "building chatstream and squall (release)"
  cargo build --release -q -p chatstream -p squall
fi
[ -x "$SQUALL" ] || die "$SQUALL is missing: cargo build --release -p squall"
[ -x "$CHATSTREAM" ] || die "$CHATSTREAM is missing: cargo build --release -p chatstream"
if [ "$ONLY" != squall ]; then
  log "compiling the Gatling simulation (Maven; first time downloads Gatling 3.14.3 into ~/.m2)"
  mvn -q -B -f "$GATLING_DIR/pom.xml" test-compile dependency:build-classpath \
    -Dmdep.outputFile="$GATLING_DIR/target/classpath.txt" -Dmdep.includeScope=test \
    >"$WORK/mvn.log" 2>&1 || { tail -30 "$WORK/mvn.log" >&2; die "mvn failed (log: $WORK/mvn.log)"; }
fi

# ---------------------------------------------------------------- measuring
# measure NAME CMD...: runs CMD in a process group of its own (cwd: $WORK/NAME), output in
# $WORK/NAME.log; samples the tree under the wrapping shell every 0.2 s into
# $WORK/NAME.samples ("wall_ms cpu_ticks rss_kb hwm_kb"); when it ends, writes
# $WORK/NAME.measure: rc, wall seconds, exact CPU seconds (user+sys of everything the
# wrapper waited for), peak RSS in KiB. The sampler's own work runs in this shell, apart.
descendants() { # pids under $1 (not $1), depth first
  local p=$1 kids k f
  for f in /proc/"$p"/task/*/children; do
    [ -r "$f" ] || continue
    kids=
    read -r kids 2>/dev/null <"$f" || true # no trailing newline: read fails but sets kids
    for k in $kids; do echo "$k"; descendants "$k"; done
  done
}
sample_tree() { # prints "cpu_ticks rss_kb max_hwm_kb" summed over the pids given
  local cpu=0 rss=0 hwm=0 p stat rest key val unit
  for p in "$@"; do
    read -r stat 2>/dev/null <"/proc/$p/stat" || continue
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    cpu=$(( cpu + ${12} + ${13} ))
    while read -r key val unit; do
      case $key in
        VmRSS:) rss=$(( rss + val )) ;;
        VmHWM:) [ "$val" -gt "$hwm" ] && hwm=$val ;;
      esac
    done 2>/dev/null <"/proc/$p/status" || true
  done
  echo "$cpu $rss $hwm"
}
measure() {
  local name=$1; shift
  local dir="$WORK/$name"
  mkdir -p "$dir"
  : >"$WORK/$name.samples"
  local started_ms=$(( ${EPOCHREALTIME/./} / 1000 ))
  # setsid: the wrapper leads a process group of its own, so clean-up can stop the tool
  # and anything it started in one signal.
  (cd "$dir" && exec setsid bash -c '"$@" >"$0.log" 2>&1; rc=$?; times >"$0.times"; exit $rc' \
     "$WORK/$name" "$@") &
  local wrapper=$!
  TOOL_PGID=$wrapper
  local peak_rss=0 peak_hwm=0 now pids line c r h
  while kill -0 "$wrapper" 2>/dev/null; do
    mapfile -t pids < <(descendants "$wrapper")
    if [ ${#pids[@]} -gt 0 ]; then
      now=$(( ${EPOCHREALTIME/./} / 1000 ))
      line=$(sample_tree "${pids[@]}")
      read -r c r h <<<"$line"
      if [ "$r" -gt 0 ]; then
        echo "$now $c $r $h" >>"$WORK/$name.samples"
        [ "$r" -gt "$peak_rss" ] && peak_rss=$r
        [ "$h" -gt "$peak_hwm" ] && peak_hwm=$h
      fi
    fi
    sleep 0.2
  done
  local rc=0
  wait "$wrapper" || rc=$?
  TOOL_PGID=
  local ended_ms=$(( ${EPOCHREALTIME/./} / 1000 ))
  # `times`, second line: the children's user and system time, e.g. "1m2.345s 0m3.210s".
  local cpu
  cpu=$(sed -n 2p "$WORK/$name.times" 2>/dev/null | awk '
    function s(x) { split(x, a, "m"); sub("s", "", a[2]); return a[1] * 60 + a[2] }
    NF == 2 { printf "%.3f", s($1) + s($2) }')
  if [ -z "$cpu" ]; then # fall back on the last sample
    cpu=$(tail -1 "$WORK/$name.samples" | awk -v t="$TICKS" '{ printf "%.3f", $2 / t }')
  fi
  [ "$peak_hwm" -gt "$peak_rss" ] && peak_rss=$peak_hwm
  printf 'rc=%s\nwall_s=%s\ncpu_s=%s\npeak_rss_kb=%s\nstarted_ms=%s\nended_ms=%s\n' \
    "$rc" "$(awk -v a="$started_ms" -v b="$ended_ms" 'BEGIN { printf "%.1f", (b - a) / 1000 }')" \
    "$cpu" "$peak_rss" "$started_ms" "$ended_ms" >"$WORK/$name.measure"
  return "$rc"
}
# window_cpu NAME FROM_MS TO_MS: CPU seconds the tool used between two wall times,
# interpolated between samples.
window_cpu() {
  awk -v a="$2" -v b="$3" -v t="$TICKS" '
    function at(x,   i) {
      if (x <= ts[1]) return cs[1]
      for (i = 2; i <= n; i++) if (ts[i] >= x)
        return cs[i-1] + (cs[i] - cs[i-1]) * (x - ts[i-1]) / (ts[i] - ts[i-1])
      return cs[n]
    }
    { n++; ts[n] = $1; cs[n] = $2 }
    END { if (n < 2 || b <= a) { print ""; exit } printf "%.3f", (at(b) - at(a)) / t }
  ' "$WORK/$1.samples"
}
m() { sed -n "s/^$2=//p" "$WORK/$1.measure"; }

# ---------------------------------------------------------------- the system under test
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "nproc $(nproc), load average $LOAD_START; work directory $WORK"
log "starting the stack (base port $BASE_PORT)"
STACK_STARTED=1
if ! "$SQUALL" stack --run-dir "$WORK/stack" up --base-port "$BASE_PORT" --json \
    >"$WORK/endpoints.json" 2>"$WORK/stack-up.log"; then
  STACK_STARTED=0
  tail -20 "$WORK/stack-up.log" >&2
  die "the stack did not start (log: $WORK/stack-up.log)"
fi
PG_URL=$(jq -r .postgres_url "$WORK/endpoints.json")
REDIS_URL=$(jq -r .redis_url "$WORK/endpoints.json")
KAFKA=$(jq -r .kafka_bootstrap "$WORK/endpoints.json")
TOXI=$(jq -r .toxiproxy_api "$WORK/endpoints.json")
SECRET=squall-dev-secret

if curl -s -o /dev/null --max-time 1 "$NODE_URL/healthz"; then
  die "something already answers on $NODE_URL"
fi
# The node's configuration, as `squall run` writes it for the scenario's one node.
cat >"$WORK/node-1.yaml" <<EOF
publish_mode: outbox
fanout_mode: redis
node_id: node-1
listen: 127.0.0.1:$NODE_PORT
postgres_url: $PG_URL
redis_url: $REDIS_URL
kafka_bootstrap: $KAFKA
token_secret: $SECRET
EOF
log "starting chatstream node at $NODE_URL"
"$CHATSTREAM" node --config "$WORK/node-1.yaml" >"$WORK/node-1.log" 2>&1 &
NODE_PID=$!
for i in $(seq 1 300); do
  kill -0 "$NODE_PID" 2>/dev/null || { tail -20 "$WORK/node-1.log" >&2; die "the node exited during start"; }
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$NODE_URL/readyz")" = 200 ] && break
  [ "$i" = 300 ] && die "the node was not ready within 60 s (log: $WORK/node-1.log)"
  sleep 0.2
done

# Waits until the node has published its outbox, so one tool's trailing work does not
# land in the other's run.
settle_node() {
  local backlog
  for _ in $(seq 1 120); do
    backlog=$(curl -s --max-time 2 "$NODE_URL/metrics" | awk '$1 ~ /^chatstream_outbox_backlog/ { s += $2 } END { print s + 0 }')
    [ "${backlog%.*}" = 0 ] && return 0
    sleep 0.5
  done
  log "the node's outbox backlog is still $backlog after 60 s; going on"
}

declare -A R # results: R[tool.key]

# ---------------------------------------------------------------- squall
run_squall() { # NAME BINARY: one squall run, measured as NAME
  local name=$1 bin=$2
  local scenario="$WORK/loadgen.yaml"
  # The shipped scenario with this run's sizes.
  sed -e "s/^  users: .*/  users: $USERS/" \
      -e "s/^    count: .*/    count: $CONVS/" \
      -e "s/^    members: .*/    members: { fixed: $MEMBERS }/" \
      -e "s/^  rate: .*/  rate: $RATE/" \
      -e "s/^  duration: .*/  duration: ${DURATION}s/" \
      -e "s/^  message_size: .*/  message_size: { fixed: $BYTES }/" \
      "$ROOT/scenarios/bench/loadgen.yaml" >"$scenario"
  for want in "  users: $USERS" "    count: $CONVS" "  rate: $RATE" "  duration: ${DURATION}s" \
              "  message_size: { fixed: $BYTES }" "    members: { fixed: $MEMBERS }"; do
    grep -qxF "$want" "$scenario" || die "could not set '$want' in $scenario (scenarios/bench/loadgen.yaml changed form?)"
  done
  cat >"$WORK/target.yaml" <<EOF
nodes: ["$NODE_URL"]
kafka_bootstrap: "$KAFKA"
redis_url: "$REDIS_URL"
postgres_url: "$PG_URL"
toxiproxy_api: "$TOXI"
token_secret: "$SECRET"
EOF
  local cmd=("$bin" run --target "$WORK/target.yaml" --reports-dir "$WORK/$name-runs" "$scenario")
  SQUALL_CMDS+=("${cmd[*]}")
  log "$name: ${cmd[*]}"
  local rc=0
  measure "$name" "${cmd[@]}" || rc=$?
  local run_json
  run_json=$(ls -1d "$WORK/$name-runs"/*/run.json 2>/dev/null | tail -1 || true)
  if [ $rc -ge 2 ] || [ -z "$run_json" ]; then
    tail -30 "$WORK/$name.log" >&2
    log "$name run failed (exit $rc; log $WORK/$name.log)"
    return 1
  fi
  local dir; dir=$(dirname "$run_json")
  R[$name.acked]=$(jq '.counters.sends_acked // 0' "$run_json")
  R[$name.sent]=$(jq '.counters.sends_invoked // 0' "$run_json")
  R[$name.seconds]=$(jq '(.warmup_s // 0) + .duration_s' "$run_json")
  R[$name.connected]=$USERS
  R[$name.run_dir]=$dir
  # The load window from the history: its origin on the wall clock, then the phases.
  local hist="$dir/history.jsonl.gz" origin t0 t1
  if [ -r "$hist" ]; then
    origin=$(zcat "$hist" 2>/dev/null | head -1 | jq -r '.origin_wall_ms // empty' 2>/dev/null || true)
    t0=$(zcat "$hist" 2>/dev/null | grep -m1 '"name":"load_start"' | jq -r .t 2>/dev/null || true)
    t1=$(zcat "$hist" 2>/dev/null | grep -m1 '"name":"load_end"' | jq -r .t 2>/dev/null || true)
    if [ -n "$origin" ] && [ -n "$t0" ] && [ -n "$t1" ]; then
      R[$name.from_ms]=$(( origin + t0 / 1000 ))
      R[$name.to_ms]=$(( origin + t1 / 1000 ))
      # The steady window: whole seconds of the run's per-second series (second s is
      # [s, s+1) after the origin), from STEADY_SKIP s after the load's start to its end.
      local s0 s1
      s0=$(( (t0 + 999999) / 1000000 + STEADY_SKIP ))
      s1=$(( t1 / 1000000 ))
      if [ -r "$dir/series.json" ] && [ "$s1" -gt "$s0" ]; then
        R[$name.steady_acks]=$(jq --argjson a "$s0" --argjson b "$s1" \
          '[.[] | select(.second >= $a and .second < $b) | .counters.sends_acked // 0] | add // 0' "$dir/series.json")
        R[$name.steady_from_ms]=$(( origin + s0 * 1000 ))
        R[$name.steady_to_ms]=$(( origin + s1 * 1000 ))
      fi
    fi
  fi
  finish_tool "$name"
}

# ---------------------------------------------------------------- Gatling
run_gatling() {
  local tag; tag="lg$(printf '%x' $(( $(date +%s) % 1048576 )))"
  local tenant="$tag-t0" csv="$WORK/gatling-users.csv"
  log "gatling: minting $USERS tokens and creating $CONVS conversations of $MEMBERS (ids $tag-*)"
  echo "user,token,conversation" >"$csv"
  # User i is in conversation i / MEMBERS. Tokens as `chatstream token` makes them (HS256
  # over {sub, tenant, exp}); minted in one python3 process when there is one, since a
  # process per token takes a minute for 1,000 users on a busy machine.
  local ttl=$(( DURATION + 3600 ))
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$tag" "$tenant" "$USERS" "$MEMBERS" "$CONVS" "$ttl" "$SECRET" >>"$csv" <<'PY'
import base64, hashlib, hmac, json, sys, time
tag, tenant, users, members, convs, ttl, secret = sys.argv[1:]
users, members, convs, ttl = int(users), int(members), int(convs), int(ttl)
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")
def part(obj):
    return b64(json.dumps(obj, separators=(",", ":")).encode())
head = part({"typ": "JWT", "alg": "HS256"})
exp = int(time.time()) + ttl
for i in range(users):
    user = f"{tag}-u{i}"
    signing = head + b"." + part({"sub": user, "tenant": tenant, "exp": exp})
    sig = b64(hmac.new(secret.encode(), signing, hashlib.sha256).digest())
    print(f"{user},{(signing + b'.' + sig).decode()},{tag}-c{min(i // members, convs - 1)}")
PY
  else
    local i u
    for (( i = 0; i < USERS; i++ )); do
      u="$tag-u$i"
      echo "$u,$("$CHATSTREAM" token --user "$u" --tenant "$tenant" --ttl "$ttl" --secret "$SECRET"),$tag-c$(( i / MEMBERS < CONVS ? i / MEMBERS : CONVS - 1 ))" >>"$csv"
    done
  fi
  # Each conversation, created by its first member (which also checks the tokens).
  local -A conv_members=() conv_token=()
  local u tok conv code
  while IFS=, read -r u tok conv; do
    conv_members[$conv]+="${conv_members[$conv]:+,}\"$u\""
    if [ -z "${conv_token[$conv]:-}" ]; then conv_token[$conv]=$tok; fi
  done < <(tail -n +2 "$csv")
  for conv in "${!conv_members[@]}"; do
    code=$(curl -s -o "$WORK/conv.out" -w '%{http_code}' --max-time 10 -X POST "$NODE_URL/api/conversations" \
      -H "Authorization: Bearer ${conv_token[$conv]}" -H 'Content-Type: application/json' \
      -d "{\"id\":\"$conv\",\"members\":[${conv_members[$conv]}]}")
    case $code in 2*) ;; *) die "creating conversation $conv: HTTP $code $(cat "$WORK/conv.out")" ;; esac
  done
  local cp; cp="$GATLING_DIR/target/test-classes:$(cat "$GATLING_DIR/target/classpath.txt")"
  # The JVM options gatling-maven-plugin 4.19 gives the JVM it forks (Java 17).
  GATLING_CMD=(java -Xmx1G -XX:+HeapDumpOnOutOfMemoryError -XX:MaxInlineLevel=20 -XX:MaxTrivialSize=12
    --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/jdk.internal.misc=ALL-UNNAMED
    -cp "$cp"
    "-DbaseUrl=$NODE_URL" "-Dusers=$USERS" "-DmessagesPerSecond=$RATE" "-DmessageBytes=$BYTES"
    "-DdurationSeconds=$DURATION" "-DfeederFile=$csv" "-DresultFile=$WORK/gatling-result.json"
    -Dgatling.data.enableAnalytics=false
    io.gatling.app.Gatling --simulation squall.ChatSimulation --results-folder "$WORK/gatling/results"
    --no-reports --launcher maven --build-tool-version 4.19.0)
  log "gatling: java ... io.gatling.app.Gatling --simulation squall.ChatSimulation (-Dusers=$USERS -DmessagesPerSecond=$RATE -DmessageBytes=$BYTES -DdurationSeconds=$DURATION)"
  local rc=0
  measure gatling "${GATLING_CMD[@]}" || rc=$?
  local res="$WORK/gatling-result.json"
  if [ ! -s "$res" ]; then
    tail -30 "$WORK/gatling.log" >&2
    log "Gatling wrote no result (exit $rc; log $WORK/gatling.log)"
    return 1
  fi
  [ $rc -ne 0 ] && log "Gatling exited with $rc (a KO request makes it non-zero only with assertions; see $WORK/gatling.log)"
  R[gatling.acked]=$(jq .acked "$res")
  R[gatling.sent]=$(jq .sent "$res")
  R[gatling.connected]=$(jq .connected "$res")
  R[gatling.from_ms]=$(jq .first_send_ms "$res")
  R[gatling.to_ms]=$(jq .last_ack_ms "$res")
  # Its users wait for each ack, so a slow node stretches Gatling's run: the rate is over
  # the time it really took (first send to last ack), never less than the duration asked.
  R[gatling.seconds]=$(awk -v d="$DURATION" -v a="${R[gatling.from_ms]}" -v b="${R[gatling.to_ms]}" \
    'BEGIN { s = (b - a) / 1000; printf "%.3f", (s > d ? s : d) }')
  # The steady window, as for squall: whole seconds of the simulation's per-second acks
  # (second s is [s, s+1) after its start), from STEADY_SKIP s after the first send to
  # the end of the schedule (first send + duration).
  local started s0 s1
  started=$(jq '.started_ms // 0' "$res")
  if [ "$started" -gt 0 ] && jq -e '.acks_per_second | type == "array"' "$res" >/dev/null 2>&1; then
    s0=$(( (R[gatling.from_ms] - started + 999) / 1000 + STEADY_SKIP ))
    s1=$(( (R[gatling.from_ms] + DURATION * 1000 - started) / 1000 ))
    if [ "$s1" -gt "$s0" ]; then
      R[gatling.steady_acks]=$(jq --argjson a "$s0" --argjson b "$s1" '.acks_per_second[$a:$b] | add // 0' "$res")
      R[gatling.steady_from_ms]=$(( started + s0 * 1000 ))
      R[gatling.steady_to_ms]=$(( started + s1 * 1000 ))
    fi
  fi
  finish_tool gatling
  if [ "${R[gatling.connected]}" -lt "$USERS" ] || [ "${R[gatling.acked]}" -eq 0 ]; then
    log "Gatling connected ${R[gatling.connected]} of $USERS users and got ${R[gatling.acked]} acks: see $WORK/gatling.log"
    return 1
  fi
}

finish_tool() {
  local t=$1
  R[$t.cpu]=$(m "$t" cpu_s)
  R[$t.wall]=$(m "$t" wall_s)
  R[$t.rss_kb]=$(m "$t" peak_rss_kb)
  R[$t.window_cpu]=
  if [ -n "${R[$t.from_ms]:-}" ] && [ -n "${R[$t.to_ms]:-}" ]; then
    R[$t.window_cpu]=$(window_cpu "$t" "${R[$t.from_ms]}" "${R[$t.to_ms]}")
  fi
  R[$t.steady_cpu]=
  if [ -n "${R[$t.steady_from_ms]:-}" ]; then
    R[$t.steady_cpu]=$(window_cpu "$t" "${R[$t.steady_from_ms]}" "${R[$t.steady_to_ms]}")
  fi
  log "$t: acked ${R[$t.acked]} of ${R[$t.sent]} sent; CPU ${R[$t.cpu]} s (load window ${R[$t.window_cpu]:-?} s; steady window ${R[$t.steady_cpu]:-?} s for ${R[$t.steady_acks]:-?} acks); peak RSS $(( ${R[$t.rss_kb]} / 1024 )) MiB; wall ${R[$t.wall]} s"
}

FAILED=0
SQUALL_CMDS=()
A_RUNS=()
B_RUNS=()
if [ "$ONLY" != gatling ]; then
  # With an A/B, the two binaries take turns (A B A B ...) on the same node, so that a
  # change in the machine's load falls on both.
  for (( round = 1; round <= ROUNDS; round++ )); do
    if [ "$ROUNDS" = 1 ]; then a=squall; b=squall-b; else a=squall-$round; b=squall-b-$round; fi
    A_RUNS+=("$a")
    run_squall "$a" "$SQUALL" || FAILED=1
    settle_node
    if [ -n "$SQUALL_B" ]; then
      B_RUNS+=("$b")
      run_squall "$b" "$SQUALL_B" || FAILED=1
      settle_node
    fi
  done
fi
if [ "$ONLY" != squall ]; then
  run_gatling || FAILED=1
  settle_node
fi

# ---------------------------------------------------------------- the table
row() { # tool -> a markdown row
  local t=$1
  [ -n "${R[$t.acked]:-}" ] || return 0
  awk -v tool="$t" -v users="$USERS" -v target="$RATE" -v acked="${R[$t.acked]}" -v sent="${R[$t.sent]}" \
      -v secs="${R[$t.seconds]}" -v cpu="${R[$t.cpu]}" -v wcpu="${R[$t.window_cpu]:-}" \
      -v from="${R[$t.from_ms]:-0}" -v to="${R[$t.to_ms]:-0}" -v rss="${R[$t.rss_kb]}" \
      -v sacks="${R[$t.steady_acks]:-}" -v scpu="${R[$t.steady_cpu]:-}" \
      -v sfrom="${R[$t.steady_from_ms]:-0}" -v sto="${R[$t.steady_to_ms]:-0}" 'BEGIN {
    rate = acked / secs
    per_cpu = cpu > 0 ? acked / cpu : 0
    if (wcpu != "" && wcpu > 0 && to > from) {
      wsecs = (to - from) / 1000
      wcol = sprintf("%.3f | %.0f", wcpu / wsecs, acked / wcpu)
    } else wcol = "- | -"
    if (scpu != "" && scpu > 0 && sto > sfrom) {
      ssecs = (sto - sfrom) / 1000
      scol = sprintf("%.0f | %.0f | %.3f | %.0f", ssecs, sacks / ssecs, scpu / ssecs, sacks / scpu)
    } else scol = "- | - | - | -"
    printf "| %s | %d | %d | %.0f | %d / %d | %.1f | %.0f | %s | %s | %.1f | %.1f |\n",
      tool, users, target, rate, acked, sent, cpu, per_cpu, wcol, scol, rss / 1024, rss / users
  }'
}
median() { # the median of the numbers given (empty ones left out), or nothing
  printf '%s\n' "$@" | awk 'NF' | sort -g | awk '{ v[++n] = $1 } END {
    if (n == 0) exit
    if (n % 2) printf "%.3f", v[(n + 1) / 2]; else printf "%.3f", (v[n / 2] + v[n / 2 + 1]) / 2
  }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b != "" && b > 0) printf "%.1f", a / b; else printf "-" }'; }
per_cpu() { [ -n "${R[$1.acked]:-}" ] && awk -v a="${R[$1.acked]}" -v c="$2" 'BEGIN { if (c > 0) printf "%.3f", a / c }'; }
steady_per_cpu() { [ -n "${R[$1.steady_acks]:-}" ] && awk -v a="${R[$1.steady_acks]}" -v c="${R[$1.steady_cpu]:-}" 'BEGIN { if (c > 0) printf "%.3f", a / c }'; }

{
  echo "# Load-generator efficiency: squall vs Gatling ($STAMP)"
  echo
  echo "One chatstream node (${CHATSTREAM#$ROOT/}, outbox publishing, Redis fan-out, default rate limits) on the local"
  echo "stack; $USERS users (one WebSocket each) in $CONVS conversations of $MEMBERS, $RATE chat messages/s in"
  echo "all, $BYTES-byte bodies, $DURATION s; each tool in turn on the same node. Machine: $(nproc) cores"
  echo "($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo);"
  echo "the node, the stack and both tools share them. $(java -version 2>&1 | head -1); Gatling 3.14.3."
  echo "Load average (1, 5, 15 min) at the start: $LOAD_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "| tool | users | target msg/s | achieved msg/s (acked) | acked / sent | CPU-s (whole process) | msgs per CPU-s | cores busy during load | msgs per CPU-s during load | steady window s | steady acked msg/s | steady cores busy | **steady msgs per CPU-s** | peak RSS MiB | RSS per user KiB |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for t in "${A_RUNS[@]}" "${B_RUNS[@]}"; do row "$t"; done
  row gatling
  echo
  # squall's figures: its one run, or the median of its runs (binary A).
  sq_steady=; sq_window=; sq_whole=; sq_rss=
  if [ ${#A_RUNS[@]} -gt 0 ]; then
    sq_steady=$(median $(for t in "${A_RUNS[@]}"; do steady_per_cpu "$t"; echo; done))
    sq_window=$(median $(for t in "${A_RUNS[@]}"; do per_cpu "$t" "${R[$t.window_cpu]:-}"; echo; done))
    sq_whole=$(median $(for t in "${A_RUNS[@]}"; do per_cpu "$t" "${R[$t.cpu]:-}"; echo; done))
    sq_rss=$(median $(for t in "${A_RUNS[@]}"; do echo "${R[$t.rss_kb]:-}"; done))
  fi
  if [ -n "$sq_steady" ] && [ -n "${R[gatling.acked]:-}" ]; then
    [ ${#A_RUNS[@]} -gt 1 ] && echo "- squall's figures below: the median of its ${#A_RUNS[@]} runs (binary A)"
    echo "- messages per harness CPU-second, squall / Gatling: **$(ratio "$sq_steady" "$(steady_per_cpu gatling)")x in the steady window** (goal: >= 5x);" \
      "$(ratio "$sq_window" "$(per_cpu gatling "${R[gatling.window_cpu]:-}")")x over the whole load window;" \
      "$(ratio "$sq_whole" "$(per_cpu gatling "${R[gatling.cpu]}")")x over the whole process"
    echo "- memory per simulated user, Gatling / squall: **$(ratio "${R[gatling.rss_kb]}" "$sq_rss")x**"
  fi
  if [ ${#B_RUNS[@]} -gt 0 ]; then
    b_steady=$(median $(for t in "${B_RUNS[@]}"; do steady_per_cpu "$t"; echo; done))
    pairs=
    for (( i = 0; i < ${#A_RUNS[@]}; i++ )); do
      pairs+="${pairs:+, }$(steady_per_cpu "${A_RUNS[$i]}" | cut -d. -f1) / $(steady_per_cpu "${B_RUNS[$i]}" 2>/dev/null | cut -d. -f1)"
    done
    echo "- A/B, steady msgs per CPU-s, A / B per round: $pairs; medians A ${sq_steady%.*}, B ${b_steady%.*}:" \
      "**B / A $(awk -v a="$sq_steady" -v b="$b_steady" 'BEGIN { if (a > 0 && b != "") printf "%.3f", b / a; else printf "-" }')**"
    echo "- A: ${SQUALL#$ROOT/}; B: ${SQUALL_B#$ROOT/}"
    if file -b "$SQUALL_B" 2>/dev/null | grep -qi text; then
      echo "- B is a script:"; echo; echo '```sh'; cat "$SQUALL_B"; echo '```'
    fi
  fi
  echo
  echo "Steady window (the headline): whole seconds from $STEADY_SKIP s after the tool's first send to the end of its"
  echo "schedule (first send + $DURATION s), the same rule for both tools; the acks counted in it from each tool's"
  echo "per-second counts (squall: series.json; Gatling: the simulation's acks_per_second), the CPU in it from the"
  echo "/proc samples. It leaves out connection set-up and the JVM's JIT warm-up, which the load window includes."
  echo "Whole process: from start to exit (squall: set-up of users, conversations and tokens, connecting,"
  echo "load, drain, reports; Gatling: JVM start and JIT warm-up, connecting, load, shut-down). During load:"
  echo "the tool's CPU between its first and last send (squall: the history's load_start..load_end;"
  echo "Gatling: first send..last ack), sampled from /proc every 0.2 s. Achieved msg/s: acked sends over"
  echo "the load duration (Gatling: over first send..last ack when longer, since its users wait for each"
  echo "ack). Peak RSS: the tool's own process tree (VmRSS sum, VmHWM), not the node's."
  echo
  echo "Commands:"
  echo
  echo '```sh'
  echo "scripts/loadgen-compare.sh --base-port $BASE_PORT --users $USERS --rate $RATE --bytes $BYTES --duration $DURATION --members $MEMBERS --steady-skip $STEADY_SKIP --only $ONLY${SQUALL_B:+ --squall-b ${SQUALL_B#$ROOT/}} --rounds $ROUNDS"
  for c in "${SQUALL_CMDS[@]}"; do echo "${c//$ROOT\//}"; done
  if [ -n "${GATLING_CMD:-}" ]; then
    printf '%s ' "${GATLING_CMD[@]}" | sed -e "s|-cp [^ ]*|-cp harness/gatling/target/test-classes:<classpath.txt>|" -e "s|$ROOT/||g"
    echo
    echo "# equivalently, through Maven (which adds its own JVM, not measured here):"
    echo "mvn -f harness/gatling/pom.xml gatling:test -DbaseUrl=$NODE_URL -Dusers=$USERS -DmessagesPerSecond=$RATE -DmessageBytes=$BYTES -DdurationSeconds=$DURATION -DfeederFile=<users.csv> -Dgatling.data.enableAnalytics=false"
  fi
  echo '```'
  if [ "$KEEP" = 1 ]; then
    for t in "${A_RUNS[@]}" "${B_RUNS[@]}"; do
      [ -n "${R[$t.run_dir]:-}" ] && { echo; echo "$t run directory: ${R[$t.run_dir]#$ROOT/}"; }
    done
  fi
} >"$REPORT"

echo
cat "$REPORT"
echo
log "written to ${REPORT#$ROOT/}"
exit $FAILED
