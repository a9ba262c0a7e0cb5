"""The compose TLS variant for real (docker-compose.tls.yml over docker-compose.yml, as `make
run TLS=1` starts it): auth on from the root token, one nginx per node (the image of
scripts/nginx-image.sh) terminating HTTPS with a client certificate. HTTPS with the client
certificate and a token reaches every node and a follower forwards; no token is 401, no
certificate 403; leader hints and redirects name the proxies; the Python client works through
them with a read token that may not write.

Own compose project, ports, certificates and token; everything removed afterwards. Skips (or
fails under RAFTKV_DOCKER_TESTS=1) like tests/docker/test_compose.py.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from raftkv.certs import init_certs
from raftkv.client import Client, Forbidden
from raftkv.localcluster import free_port, wait_until
from tests.docker.test_compose import ROOT, _compose_command, _ensure_engine, _run

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

NODES = ("n1", "n2", "n3")
FILES = ("docker-compose.yml", "docker-compose.tls.yml")
NGINX_SCRIPT = ROOT / "scripts" / "nginx-image.sh"


@dataclass
class TlsCluster:
    compose: list[str]
    project: str
    image: str
    tls_dir: Path
    http_ports: dict[str, int]
    https_ports: dict[str, int]
    root_token: str
    cluster_token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RAFTKV_IMAGE": self.image, "RAFTKV_CONTAINER_PREFIX": self.project,
                    "RAFTKV_CLUSTER_TOKEN": self.cluster_token,
                    "COMPOSE_PROJECT_NAME": self.project, "RAFTKV_TLS_DIR": str(self.tls_dir)})
        for i, nid in enumerate(NODES, start=1):
            env[f"RAFTKV_HTTP_PORT_{i}"] = str(self.http_ports[nid])
            env[f"RAFTKV_HTTPS_PORT_{i}"] = str(self.https_ports[nid])
        return env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [arg for f in FILES for arg in ("-f", str(ROOT / f))]
        return _run([*self.compose, "-p", self.project, *files, *args], timeout_s=180,
                    env=self.env, check=check)

    def url(self, nid: str) -> str:
        return f"https://127.0.0.1:{self.https_ports[nid]}"

    def context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        if client_cert:
            ctx.load_cert_chain(self.tls_dir / "client.pem", self.tls_dir / "client.key")
        return ctx

    def request(self, nid: str, method: str, path: str, body: object = None, *,
                token: str | None = "root", client_cert: bool = True
                ) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.https_ports[nid], timeout=10,
                                           context=self.context(client_cert))
        try:
            headers = {} if token is None else {
                "Authorization": f"Bearer {self.root_token if token == 'root' else token}"}
            conn.request(method, path, None if body is None else json.dumps(body).encode(),
                         headers)
            resp = conn.getresponse()
            raw = resp.read()
            return (resp.status, json.loads(raw) if raw else None,
                    {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()

    def status(self, nid: str) -> dict[str, Any]:
        code, body, _ = self.request(nid, "GET", "/status")
        if code != 200:
            raise ValueError(f"{nid} /status answered {code}: {body}")
        return body  # type: ignore[no-any-return]


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TlsCluster]:
    _ensure_engine()
    compose = _compose_command()
    image = os.environ.get("RAFTKV_IMAGE", "raftkv:latest")
    if _run(["docker", "image", "inspect", image], check=False).returncode != 0:
        pytest.fail(f"the image {image} is not there: build it with `make image`")
    _run(["bash", str(NGINX_SCRIPT)], timeout_s=600)
    tls_dir = tmp_path / "tls"
    init_certs(tls_dir, list(NODES))
    root_token = secrets.token_hex(32)
    (tls_dir / "root.token").write_text(root_token + "\n")
    (tls_dir / "root.token").chmod(0o644)  # the nodes' container user reads it
    c = TlsCluster(compose, f"raftkv-tlstest-{uuid.uuid4().hex[:8]}", image, tls_dir,
                   {n: free_port() for n in NODES}, {n: free_port() for n in NODES},
                   root_token)
    try:
        c.run("up", "--detach", "--no-build")
        yield c
    except BaseException:
        print(c.run("logs", "--no-color", "--tail", "100", check=False).stdout)
        raise
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(c.run("logs", "--no-color", "--tail", "100", check=False).stdout)
        c.run("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)


def test_https_with_client_certificates_and_tokens(cluster: TlsCluster) -> None:
    c = cluster

    def leader() -> str | None:
        seen = {nid: c.status(nid) for nid in NODES}
        leaders = {st["leader"] for st in seen.values()}
        return leaders.pop() if len(leaders) == 1 and None not in leaders else None

    lead = wait_until(leader, 90, "a leader agreed on through the proxies", interval_s=0.2)
    follower = next(n for n in NODES if n != lead)
    code, body, _ = c.request(follower, "PUT", "/keys/tls", {"value": "yes"})
    assert code == 200, body
    for nid in NODES:
        code, body, _ = c.request(nid, "GET", "/keys/tls")
        assert (code, body["value"]) == (200, "yes")
    code, body, _ = c.request(follower, "GET", "/keys/tls", token=None)
    assert (code, body["error"], body["leader"]) == (401, "unauthenticated", c.url(lead))
    code, body, _ = c.request(follower, "GET", "/health", client_cert=False)
    assert (code, body["error"]) == (403, "client_certificate_required")
    code, _, headers = c.request(follower, "PUT", "/keys/r?redirect=true", {"value": 1})
    assert code == 307 and headers["location"] == f"{c.url(lead)}/keys/r"

    urls = [c.url(n) for n in NODES]
    with Client(urls, token=c.root_token, ssl_context=c.context()) as admin:
        reader = admin.token_create("read", ["tls"])
    with Client(urls, token=reader.token, ssl_context=c.context()) as kv:
        assert kv.get("tls").value == "yes"
        with pytest.raises(Forbidden):
            kv.put("tls", "no")
