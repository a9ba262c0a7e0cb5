#!/usr/bin/env bash
# `scripts/apt-install.sh PACKAGE...`: install Debian packages for a step that needs a tool
# (CI's nginx and firewall tools, the benchmark's etcd), saying so on stderr. Needs root and
# apt-get; otherwise it exits 1 and says what to install. Tries without `apt-get update`
# first (a fresh machine's lists may do), then with it. The packages' services are not
# started (a policy-rc.d that refuses, unless the machine has one already): the steps run the
# tools themselves, on ports of their own.
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-install: not root with apt-get here: install $* yourself" >&2
  exit 1
fi
echo "apt-install: apt-get install $*" >&2
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "$@" >&2 \
  || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "$@" >&2; }
