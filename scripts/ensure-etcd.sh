#!/usr/bin/env bash
# `make bench ARGS='--compare etcd'` needs an etcd binary. If none is on PATH, install Debian's
# etcd-server (etcd 3.4) with apt when running as root; otherwise say what to install.
# The Debian package starts no etcd service we rely on: the benchmark runs its own members
# (the package's own etcd.service is stopped and disabled if it started one).
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-etcd: etcd is not installed and this is not root with apt: install etcd-server (Debian) or put etcd on PATH" >&2
  exit 1
fi
echo "ensure-etcd: installing etcd-server with apt (for the etcd comparison)" >&2
# policy-rc.d 101: the package must not start a system etcd on the ports the benchmark uses.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >&2 \
  || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends etcd-server >&2; }
command -v etcd >/dev/null 2>&1 || { echo "ensure-etcd: etcd-server installed but no etcd on PATH" >&2; exit 1; }
