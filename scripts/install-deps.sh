#!/usr/bin/env bash
# Installs what Squall's real local stack needs on a fresh Debian machine, idempotently:
#   - Redis and PostgreSQL servers (Debian packages), kcat (an independent Kafka client),
#     Chromium (headless, for the test that renders a run's report.html offline)
#   - cmake and the curl headers, which the rdkafka crate's cmake-build of librdkafka wants
#   - Apache Kafka's broker jars (pinned in scripts/kafka/pom.xml), resolved from Maven Central
#   - the Toxiproxy server (pinned below), built with `go install` from its Go module
# Downloads are cached in their usual homes (~/.m2, ~/go/pkg/mod, ~/.cargo); the installed
# tools land in $SQUALL_HOME (default ~/.cache/squall), where `squall stack up` finds them.
# Run it again at any time: what is already in place is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SQUALL_HOME="${SQUALL_HOME:-$HOME/.cache/squall}"
TOXIPROXY_VERSION="v2.12.0"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")"

log() { printf '[install-deps] %s\n' "$*" >&2; }
need() {
  # need <command> <how to install it>
  command -v "$1" >/dev/null 2>&1 || { log "missing: '$1' is not on PATH; install it with: $2"; exit 1; }
}

mkdir -p "$SQUALL_HOME/bin"

# --- Debian packages ---------------------------------------------------------------
apt_packages=()
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_packages+=(postgresql)
command -v psql >/dev/null 2>&1 || apt_packages+=(postgresql-client)
command -v cmake >/dev/null 2>&1 || apt_packages+=(cmake)
command -v kcat >/dev/null 2>&1 || apt_packages+=(kcat)
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] || apt_packages+=(libcurl4-openssl-dev)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${apt_packages[*]}; install them with: sudo apt-get update && sudo apt-get install -y ${apt_packages[*]}"
    exit 1
  fi
  need apt-get "a Debian-based machine (this script installs Debian packages)"
  log "installing Debian packages: ${apt_packages[*]}"
  apt-get update -qq
  # The packages' own services are not used (Squall runs its own instances), so keep
  # their start scripts from running in a container without an init system.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# --- Apache Kafka broker jars --------------------------------------------------------
kafka_dir="$SQUALL_HOME/kafka-$KAFKA_VERSION"
# COMPLETE records the pom it was resolved from: a changed pom (a new jar) resolves again.
pom_sum="$(sha256sum "$here/kafka/pom.xml" | cut -c1-16)"
if [ ! -f "$kafka_dir/COMPLETE" ] || ! grep -q "$pom_sum" "$kafka_dir/COMPLETE"; then
  need java "apt-get install -y openjdk-17-jre-headless"
  need mvn "apt-get install -y maven"
  log "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $kafka_dir"
  rm -rf "$kafka_dir"
  mkdir -p "$kafka_dir/lib"
  (cd "$here/kafka" && mvn -q -B dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$kafka_dir/lib")
  printf '%s\n%s\n' "$KAFKA_VERSION" "$pom_sum" > "$kafka_dir/COMPLETE"
fi
ln -sfn "$kafka_dir" "$SQUALL_HOME/kafka"

# --- Toxiproxy server ----------------------------------------------------------------
toxi_dir="$SQUALL_HOME/toxiproxy-$TOXIPROXY_VERSION"
if [ ! -x "$toxi_dir/toxiproxy-server" ]; then
  need go "apt-get install -y golang (or https://go.dev/dl)"
  log "building Toxiproxy $TOXIPROXY_VERSION with go install into $toxi_dir"
  mkdir -p "$toxi_dir"
  GOBIN="$toxi_dir" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$toxi_dir/server" "$toxi_dir/toxiproxy-server"
fi
ln -sfn "$toxi_dir/toxiproxy-server" "$SQUALL_HOME/bin/toxiproxy-server"

log "ready: Kafka $KAFKA_VERSION, Toxiproxy $TOXIPROXY_VERSION, $(redis-server --version | cut -d' ' -f3), PostgreSQL $(ls /usr/lib/postgresql | sort -V | tail -1) (tools in $SQUALL_HOME)"
