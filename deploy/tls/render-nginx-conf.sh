#!/bin/sh
# Render raftkv's nginx TLS proxy configuration (deploy/tls/*.conf.in) to stdout.
#
#   render-nginx-conf.sh PREFIX CERTS NAME,LISTEN,UPSTREAM [NAME,LISTEN,UPSTREAM ...]
#
# PREFIX: nginx's own directory (pid, logs, temp files; created here). CERTS: the directory of
# `raftkv certs init` (ca.pem, and NAME.pem / NAME.key for each server). One server per node:
# NAME its id, LISTEN where nginx listens for HTTPS (host:port), UPSTREAM the node's plain HTTP
# address (host:port). POSIX sh and sed only.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 3 ] || { echo "usage: $0 PREFIX CERTS NAME,LISTEN,UPSTREAM ..." >&2; exit 2; }
prefix=$1 certs=$2
shift 2
for d in body proxy fastcgi uwsgi scgi; do mkdir -p "$prefix/tmp/$d"; done
# Started as root, nginx's workers run as nobody (its compiled-in default): their temp files.
if [ "$(id -u)" = 0 ]; then chown -R nobody "$prefix/tmp"; fi
servers=$(mktemp)
trap 'rm -f "$servers"' EXIT
for spec in "$@"; do
  IFS=, read -r name listen upstream <<SPEC
$spec
SPEC
  [ -n "$name" ] && [ -n "$listen" ] && [ -n "$upstream" ] \
    || { echo "$0: bad server $spec: NAME,LISTEN,UPSTREAM" >&2; exit 2; }
  sed -e "s|@NAME@|$name|g" -e "s|@LISTEN@|$listen|g" -e "s|@UPSTREAM@|$upstream|g" \
      -e "s|@CERTS@|$certs|g" "$here/server.conf.in" >> "$servers"
done
sed -e "s|@PREFIX@|$prefix|g" -e "/@SERVERS@/{
r $servers
d
}" "$here/nginx.conf.in"
