# raftkv node image. Built offline from a wheelhouse that `make wheels` puts in ./wheels
# (raftkv's own wheel plus binary wheels of its dependencies for the base image's Python):
#   make image                       # or, by hand:
#   docker build --build-arg BASE_IMAGE=python:3.12-slim -t raftkv:latest .
# The base may be python:3.X-slim or any Debian image with python3 and python3-venv
# (scripts/docker-host-setup.sh builds one where no registry is reachable).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS install
COPY wheels/ /wheels/
# No network: pip sees only the wheelhouse. The venv keeps the install out of the base's
# site-packages and is copied whole into the final stage (same base, same paths).
RUN python3 -m venv /opt/raftkv \
 && /opt/raftkv/bin/pip install --no-cache-dir --no-index --find-links /wheels raftkv \
 && /opt/raftkv/bin/pip uninstall --yes --quiet pip \
 && /opt/raftkv/bin/raftkv --help >/dev/null

FROM ${BASE_IMAGE}
COPY --from=install /opt/raftkv /opt/raftkv
RUN groupadd --gid 10001 raftkv \
 && useradd --uid 10001 --gid raftkv --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin raftkv \
 && mkdir -p /data && chown raftkv:raftkv /data && chmod 0700 /data
ENV PATH=/opt/raftkv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAFTKV_DATA_DIR=/data \
    RAFTKV_HTTP_ADDR=0.0.0.0:4001 \
    RAFTKV_RAFT_ADDR=0.0.0.0:5001
# A named volume mounted here starts with this directory's owner (raftkv).
VOLUME ["/data"]
USER raftkv:raftkv
WORKDIR /data
EXPOSE 4001 5001
# Liveness only (/ready would mark a node unhealthy while the cluster has no leader).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('RAFTKV_HTTP_ADDR', '0.0.0.0:4001').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).close()"]
# Run under an init (compose `init: true`, `docker run --init`): `docker stop` sends SIGTERM,
# the node hands leadership over and exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["raftkv"]
CMD ["serve"]
