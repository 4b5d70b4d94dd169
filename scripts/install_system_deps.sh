#!/usr/bin/env bash
# Installs the system programs the integration tests use, when missing: redis-server, Prometheus
# and promtool (package prometheus), docker-compose (validates the compose file; no engine needed).
# Needs root or sudo; without either it says what to install and the tests that need it skip.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  apt=(apt-get)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  apt=(sudo apt-get)
else
  echo "kvevict: please install: ${missing[*]} (e.g. apt-get install ${missing[*]}); tests needing them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}"
