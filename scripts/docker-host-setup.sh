#!/usr/bin/env bash
# scripts/docker-host-setup.sh - make this machine able to build and run raftkv's image.
#
# For a Debian or Ubuntu host, as root, with or without a container registry in reach (CI
# has apt and PyPI only). `make image`, `make run`, `make test-docker` and .ci/run call it;
# run it by hand with:
#
#   sudo scripts/docker-host-setup.sh            # prints the base image to build on
#   make image BASE_IMAGE="$(sudo scripts/docker-host-setup.sh)"
#
# What it does, each step only when it is needed (so a second run changes nothing):
#   1. a Docker engine: when `docker info` fails, installs the engine with apt if it is not
#      there and starts it: through systemd where systemd runs, else dockerd by hand in the
#      background, its log in $RAFTKV_DOCKERD_LOG (default /var/log/raftkv-dockerd.log);
#   2. a compose: `docker compose` (v2) if the client has it, else docker-compose (v1, apt);
#   3. the base image, printed on stdout: $RAFTKV_UPSTREAM_BASE (default python:3.12-slim)
#      if it is here or can be pulled; else a local Debian + python3 image
#      ($RAFTKV_LOCAL_BASE, default raftkv-base/debian-python:bookworm), built once with
#      mmdebstrap and `docker import`, from Debian's package mirror alone.
#
# apt packages it may install (--no-install-recommends), and why:
#   docker.io        the engine: dockerd, containerd, runc (and a docker client)
#   iptables         dockerd sets up its bridge network with it
#   cgroupfs-mount   mounts the cgroup hierarchies where nothing has mounted them
#   docker-compose   compose v1, where the docker client has no `compose` plugin
#   mmdebstrap       builds the local base image (only when the upstream one can't be had)
#
# Non-interactive and safe to run twice at once (a lock). Everything it says goes to
# stderr; stdout carries one line, the base image, so `BASE_IMAGE=$(...)` works. Exit 0 on
# success; non-zero (with the reason on stderr) when a step fails or when something must be
# installed or started and this is not root.
set -euo pipefail

UPSTREAM_BASE=${RAFTKV_UPSTREAM_BASE:-python:3.12-slim}
SUITE=${RAFTKV_DEBIAN_SUITE:-bookworm}                 # bookworm's python3 is 3.11
LOCAL_BASE=${RAFTKV_LOCAL_BASE:-raftkv-base/debian-python:$SUITE}
DOCKERD_LOG=${RAFTKV_DOCKERD_LOG:-/var/log/raftkv-dockerd.log}
ENGINE_WAIT_S=${RAFTKV_ENGINE_WAIT_S:-90}
PULL_TIMEOUT_S=${RAFTKV_PULL_TIMEOUT_S:-120}
# RAFTKV_DEBIAN_MIRROR (optional): a mirror URL, a one-line "deb ..." entry or a sources file
# for mmdebstrap; unset, mmdebstrap uses Debian's default mirror with -updates and -security.
export DEBIAN_FRONTEND=noninteractive

# Keep the real stdout as fd 3 for the one result line; everything else goes to stderr.
exec 3>&1 1>&2
say() { printf '[docker-host-setup] %s\n' "$*"; }
die() { say "error: $*"; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "$1 needs root: run this script as root (sudo)"; }
engine_answers() { docker info >/dev/null 2>&1; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

apt_updated=0
apt_install() {
  need_root "installing $*"
  command -v apt-get >/dev/null || die "no apt-get here: install $* yourself"
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Two runs at once (CI's step and the docker test's fallback) would race to start dockerd or
# build the base twice: take a lock when we can create one (root), else go on without it.
if [ -w /var/lock ] || [ -w /run/lock ]; then
  lock_dir=/run/lock; [ -w "$lock_dir" ] || lock_dir=/var/lock
  exec 9>"$lock_dir/raftkv-docker-host-setup.lock"
  flock 9
fi

# ------------------------------------------------------------------------ 1. the engine
if ! engine_answers; then
  need_root "starting a Docker engine"
  missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v iptables >/dev/null || missing+=(iptables)
  # dockerd refuses to start without cgroups: cgroup v2 (cgroup.controllers at the top) or
  # the v1 hierarchies. cgroupfs-mount mounts the latter on hosts where nothing did.
  cgroups_mounted() {
    [ -e /sys/fs/cgroup/cgroup.controllers ] || mountpoint -q /sys/fs/cgroup/memory
  }
  if ! cgroups_mounted && ! command -v cgroupfs-mount >/dev/null; then
    missing+=(cgroupfs-mount)
  fi
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  cgroups_mounted || { say "mounting the cgroup hierarchies"; cgroupfs-mount; }
  # Kernels without nf_tables: fall back to the legacy iptables backend.
  if ! iptables -nL >/dev/null 2>&1 && [ -x /usr/sbin/iptables-legacy ]; then
    say "iptables (nf_tables) does not work here: switching to iptables-legacy"
    update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null
  fi
  if [ -d /run/systemd/system ]; then
    say "systemctl start docker"
    systemctl start docker
  else
    # No systemd: start dockerd ourselves, in its own session so it outlives this script.
    # It must not inherit fd 3 (our stdout, read by `$(...)`) or fd 9 (the lock), or the
    # caller and the next run would wait for dockerd to exit.
    # A dockerd (or its containerd) that was killed leaves its pid file behind, and a new one
    # refuses to start while it is there ("pid file found"): remove it when no such daemon
    # runs under that pid.
    for pidfile in /var/run/docker.pid:dockerd /var/run/docker/containerd/containerd.pid:containerd; do
      file=${pidfile%%:*} name=${pidfile##*:}
      if [ -f "$file" ] && [ "$(cat "/proc/$(cat "$file" 2>/dev/null)/comm" 2>/dev/null)" != "$name" ]; then
        say "removing the stale $file (no $name runs under its pid)"
        rm -f "$file"
      fi
    done
    say "starting dockerd in the background (log: $DOCKERD_LOG)"
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null 3>&- 9>&- &
  fi
  deadline=$((SECONDS + ENGINE_WAIT_S))
  until engine_answers; do
    [ "$SECONDS" -lt "$deadline" ] || die "no engine answers ${ENGINE_WAIT_S}s after start; see $DOCKERD_LOG"
    sleep 0.5
  done
  say "the Docker engine answers"
fi

# ------------------------------------------------------------------------ 2. compose
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  apt_install docker-compose
fi

# ------------------------------------------------------------------------ 3. the base image
# Once the local base is built it is used without asking a registry again (no pull that
# waits for a time-out on every run).
if have_image "$UPSTREAM_BASE"; then
  base=$UPSTREAM_BASE
elif have_image "$LOCAL_BASE"; then
  base=$LOCAL_BASE
elif timeout "$PULL_TIMEOUT_S" docker pull --quiet "$UPSTREAM_BASE" >/dev/null 2>&1; then
  say "pulled $UPSTREAM_BASE"
  base=$UPSTREAM_BASE
else
  base=$LOCAL_BASE
  need_root "building the local base image"
  command -v mmdebstrap >/dev/null || apt_install mmdebstrap
  say "$UPSTREAM_BASE cannot be pulled: building $LOCAL_BASE (Debian $SUITE + python3)"
  # What the Dockerfile needs: python3 with venv (the install stage) and useradd/groupadd
  # (passwd); CA certificates and time zones as in python:*-slim. Kept small like a -slim
  # image: no recommends, docs, man pages or locales. pip may install into /usr/local as
  # in the python images (no EXTERNALLY-MANAGED marker). The image is tagged only once
  # `docker import` has it whole, so a failed build leaves no half image behind.
  # shellcheck disable=SC2016  # $1 is mmdebstrap's, expanded inside its hooks
  image_id=$(mmdebstrap --variant=apt --quiet \
      --aptopt='APT::Install-Recommends "false"' \
      --include=python3,python3-venv,python3-pip,python-is-python3,passwd,ca-certificates,tzdata,netbase \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
      "$SUITE" - ${RAFTKV_DEBIAN_MIRROR:+"$RAFTKV_DEBIAN_MIRROR"} </dev/null \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' -)
  docker tag "$image_id" "$LOCAL_BASE"
  say "built $LOCAL_BASE ($image_id)"
fi

python_version=$(docker run --rm --entrypoint python3 "$base" \
  -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
  || die "cannot run python3 in $base"
say "base image: $base (Python $python_version)"
echo "$base" >&3
