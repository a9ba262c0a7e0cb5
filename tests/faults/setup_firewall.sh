#!/usr/bin/env bash
# Installs the firewall tools that the partition faults of tests/faults need (nftables, with
# iptables as the fallback). CI calls it before the tests and `make faults` before a run; it
# never fails either: without the tools (scripts/apt-install.sh says why: not root, no apt,
# or apt-get failed) the partition faults are skipped with the reason printed.
set -uo pipefail
if command -v nft >/dev/null 2>&1 && command -v iptables >/dev/null 2>&1; then
  echo "setup_firewall: nft and iptables present"
  exit 0
fi
if bash "$(dirname "$0")/../../scripts/apt-install.sh" nftables iptables; then
  echo "setup_firewall: installed nftables and iptables"
else
  echo "setup_firewall: nftables and iptables not installed: partition faults will be skipped"
fi
exit 0
