"""The client port behind Debian's nginx (deploy/tls): HTTPS with a client certificate made by
`raftkv certs init` reaches the node; no or a wrongly signed certificate is refused (403 in the
JSON error shape); a follower's forwarding works behind it; leader hints and 307 redirects
name the proxies (the nodes advertise https://<proxy>); the Python client and the CLI work
through it with a token. Skipped, with the reason, where nginx is not installed (CI installs
it: apt-get install nginx-light)."""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.certs import init_certs
from raftkv.cli import EXIT_OK, main
from raftkv.client import Client
from raftkv.localcluster import FAST_TIMING, LocalCluster, NodeProc, reserve_port, wait_until

pytestmark = pytest.mark.integration

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
RENDER = Path(__file__).resolve().parents[2] / "deploy" / "tls" / "render-nginx-conf.sh"
ROOT = secrets.token_hex(32)


class Proxied:
    """A LocalCluster whose nodes each sit behind one nginx (one process, a server each)."""

    def __init__(self, cluster: LocalCluster, certs: Path, ports: dict[str, int],
                 nginx: subprocess.Popen[bytes], prefix: Path) -> None:
        self.cluster, self.certs, self.ports = cluster, certs, ports
        self.nginx, self.prefix = nginx, prefix

    def https(self, node: NodeProc) -> str:
        return f"https://{node.http_host}:{self.ports[node.node_id]}"

    def context(self, client_cert: str | None = "client", ca: Path | None = None
                ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca or self.certs / "ca.pem"))
        if client_cert is not None:
            ctx.load_cert_chain(self.certs / f"{client_cert}.pem",
                                self.certs / f"{client_cert}.key")
        return ctx

    def request(self, node: NodeProc, method: str, path: str, body: object = None, *,
                context: ssl.SSLContext | None = None,
                token: str | None = ROOT) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPSConnection(node.http_host, self.ports[node.node_id],
                                           timeout=10, context=context or self.context())
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            data = None if body is None else json.dumps(body).encode()
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return (resp.status, json.loads(raw) if raw else None,
                    {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()


@pytest.fixture
def proxied(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Proxied]:
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    certs = tmp_path / "certs"
    c = LocalCluster(tmp_path / "cluster", 3, env=FAST_TIMING, root_token=ROOT)
    init_certs(certs, [n.node_id for n in c.nodes], [n.http_host for n in c.nodes])
    held = {n.node_id: reserve_port(n.http_host) for n in c.nodes}
    ports = {nid: int(sock.getsockname()[1]) for nid, sock in held.items()}
    for n in c.nodes:
        n.env["RAFTKV_HTTP_ADVERTISE"] = f"https://{n.http_host}:{ports[n.node_id]}"
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    servers = [f"{n.node_id},{n.http_host}:{ports[n.node_id]},{n.http}" for n in c.nodes]
    conf = subprocess.run(["sh", str(RENDER), str(prefix), str(certs), *servers],
                          capture_output=True, text=True, check=True).stdout
    (prefix / "nginx.conf").write_text(conf)
    for sock in held.values():
        sock.close()
    nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                              "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proxied = Proxied(c, certs, ports, nginx, prefix)
    try:
        c.start_all()
        c.wait_for_leader()
        c.wait_all_ready()
        wait_until(lambda: proxied.request(c.nodes[0], "GET", "/health")[0] == 200, 10,
                   "nginx to answer")
        yield proxied
    except BaseException:
        print(c.dump_logs())
        print((prefix / "error.log").read_text() if (prefix / "error.log").exists() else "")
        raise
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(c.dump_logs())
        c.close()
        if nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(10)


def test_https_with_a_client_certificate_reaches_every_node(proxied: Proxied) -> None:
    c = proxied.cluster
    leader = c.wait_for_leader()
    follower = next(n for n in c.nodes if n is not leader)
    # A follower's forwarding behind its proxy.
    code, body, _ = proxied.request(follower, "PUT", "/keys/tls", {"value": "yes"})
    assert code == 200, body
    for n in c.nodes:
        code, body, _ = proxied.request(n, "GET", "/keys/tls")
        assert (code, body["value"]) == (200, "yes")
        # The token is still needed behind the proxy.
        code, body, _ = proxied.request(n, "GET", "/keys/tls", token=None)
        assert (code, body["error"]) == (401, "unauthenticated")
    # Leader hints and redirects name the proxies.
    code, body, headers = proxied.request(follower, "PUT", "/keys/r?redirect=true", {"value": 1})
    assert code == 307
    assert headers["location"] == f"{proxied.https(leader)}/keys/r"
    assert body["leader"] == proxied.https(leader)
    code, body, _ = proxied.request(follower, "GET", "/keys/absent")
    assert code == 404 and body["leader"] == proxied.https(leader)
    code, status, _ = proxied.request(follower, "GET", "/status")
    assert {m["http_address"] for m in status["members"]} == {
        proxied.https(n) for n in c.nodes}


def test_no_or_a_foreign_client_certificate_is_refused(proxied: Proxied,
                                                       tmp_path: Path) -> None:
    node = proxied.cluster.nodes[0]
    code, body, _ = proxied.request(node, "GET", "/health", context=proxied.context(None))
    assert code == 403 and body["error"] == "client_certificate_required"
    other = tmp_path / "other-ca"
    init_certs(other, ["client2"])
    foreign = ssl.create_default_context(cafile=str(proxied.certs / "ca.pem"))
    foreign.load_cert_chain(other / "client.pem", other / "client.key")
    code, body, _ = proxied.request(node, "GET", "/health", context=foreign)
    assert code == 403 and body["error"] == "client_certificate_required"
    # And a client that trusts another CA refuses the proxy.
    with pytest.raises(ssl.SSLCertVerificationError):
        proxied.request(node, "GET", "/health", context=proxied.context(ca=other / "ca.pem"))


def test_client_and_cli_through_the_proxies(proxied: Proxied, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    c = proxied.cluster
    urls = [proxied.https(n) for n in c.nodes]
    with Client(urls, token=ROOT, ssl_context=proxied.context()) as kv:
        made = kv.token_create("write", ["app/"])
        for i in range(20):
            kv.put(f"app/{i}", i)
    token_file = tmp_path / "token"
    token_file.write_text(made.token)
    for name in ("RAFTKV_TOKEN", "RAFTKV_TOKEN_FILE", "RAFTKV_CACERT", "RAFTKV_CERT",
                 "RAFTKV_KEY"):
        monkeypatch.delenv(name, raising=False)
    certs = proxied.certs
    tls = ["--cacert", str(certs / "ca.pem"), "--cert", str(certs / "client.pem"),
           "--key", str(certs / "client.key"), "--urls", ",".join(urls)]
    code = main(["get", "app/3", "--token-file", str(token_file), *tls])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert json.loads(out)["value"] == 3
    assert main(["status", "--token-file", str(token_file), *tls]) == EXIT_OK
    table = capsys.readouterr().out
    assert table.count("https://") == 3 and "no:" not in table
