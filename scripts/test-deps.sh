#!/usr/bin/env bash
# System tools the deploy tests use: docker-compose (to validate docker-compose.yml; no engine
# needed) and iproute2 (network namespaces for the multi-node test). Installed when missing and
# this is a root shell with apt; otherwise those tests say what is missing.
set -euo pipefail
if command -v docker-compose >/dev/null && command -v ip >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose iproute2 >/dev/null
else
  echo "note: docker-compose and/or ip are missing; install them (root) for the deploy tests" >&2
fi
