#!/usr/bin/env bash
# scripts/nginx-image.sh - the TLS-terminating proxy image of the compose TLS variant
# (docker-compose.tls.yml, `make run TLS=1`): Debian's nginx-light on Debian bookworm, built
# once with mmdebstrap and `docker import` from Debian's package mirror alone (no registry
# needed, like the local base of scripts/docker-host-setup.sh). Prints the image name on
# stdout; does nothing when the image exists. As root where mmdebstrap must be installed.
#
#   RAFTKV_NGINX_IMAGE     the image (default raftkv-nginx:bookworm)
#   RAFTKV_DEBIAN_SUITE    (default bookworm); RAFTKV_DEBIAN_MIRROR as for docker-host-setup.sh
set -euo pipefail
IMAGE=${RAFTKV_NGINX_IMAGE:-raftkv-nginx:bookworm}
SUITE=${RAFTKV_DEBIAN_SUITE:-bookworm}
export DEBIAN_FRONTEND=noninteractive
exec 3>&1 1>&2
say() { printf '[nginx-image] %s\n' "$*"; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE" >&3
  exit 0
fi
if ! command -v mmdebstrap >/dev/null; then
  [ "$(id -u)" -eq 0 ] || { say "error: mmdebstrap is missing: run as root"; exit 1; }
  apt-get update -qq && apt-get install -y -qq --no-install-recommends mmdebstrap
fi
say "building $IMAGE (Debian $SUITE + nginx-light)"
# nginx-light: nginx with the SSL and proxy modules, no extras. The compose file runs it in
# the foreground with the configuration rendered from deploy/tls (render-nginx-conf.sh).
image_id=$(mmdebstrap --variant=apt --quiet \
    --aptopt='APT::Install-Recommends "false"' \
    --include=nginx-light,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" - ${RAFTKV_DEBIAN_MIRROR:+"$RAFTKV_DEBIAN_MIRROR"} </dev/null \
  | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["nginx", "-g", "daemon off;"]' -)
docker tag "$image_id" "$IMAGE"
say "built $IMAGE ($image_id)"
echo "$IMAGE" >&3
