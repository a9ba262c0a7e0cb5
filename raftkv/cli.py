"""`raftkv serve | cluster | get | put | delete | status | members | backup | restore | lease |
lock | alarm | token | certs` — the composition root.

Client commands take a token for clusters with auth, the first of: `--token` (visible in `ps`),
`--token-file FILE`, RAFTKV_TOKEN, RAFTKV_TOKEN_FILE (a file keeps it out of `ps` and shell
history); and, behind a TLS-terminating proxy, https:// URLs with `--cacert`, `--cert`, `--key`
(RAFTKV_CACERT, RAFTKV_CERT, RAFTKV_KEY).

Exit codes: 0 ok, 1 the request failed (e.g. key or lease not found, conflict), 2 bad usage or
settings, 3 the cluster is unavailable (no leader, timeout, unreachable). `raftkv lock NAME --
command...` exits with the command's status (128 + N if a signal N ended it), or 4 if the
lock was lost while the command ran (the command is then stopped: SIGTERM, SIGKILL after
LOCK_LOST_GRACE_S).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from raftkv.digits import finite_json_float, reject_json_constant
from raftkv.settings import SettingsError, add_arguments, from_sources

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_LOCK_LOST = 4
LOCK_LOST_GRACE_S = 5.0
"""How long a command whose lock was lost gets to stop after SIGTERM, before SIGKILL."""

def configure_logging(level: str, node_id: str | None = None) -> None:
    prefix = f"{node_id} " if node_id else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(message)s",
        stream=sys.stderr,
    )


# ---------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = from_sources(args, os.environ)
    except SettingsError as e:
        print(f"raftkv serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.node_id)
    from raftkv.runtime.process import RaftProcess, StartupError

    try:
        node = RaftProcess(settings)
    except StartupError as e:
        log.error("event=startup_failed node=%s error=%s", settings.node_id, e)
        print(f"raftkv serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    code = node.run()
    if node.driver.fatal is not None:
        print(f"raftkv serve: stopped: {node.driver.fatal}", file=sys.stderr)
        return EXIT_FAILED
    if code == EXIT_USAGE:
        print("raftkv serve: could not join the cluster (see the log above)", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------- token
def cmd_token(args: argparse.Namespace) -> int:
    """`raftkv token generate [--file PATH]`: print a new cluster token, or keep one in PATH
    (created with mode 0600 if it does not hold a valid token yet; an existing one is kept, so
    every node started from that file shares it)."""
    from raftkv.settings import check_cluster_token, generate_token, read_token_file

    if not args.file:
        print(generate_token())
        return EXIT_OK
    path = Path(args.file)
    if path.exists():
        try:
            check_cluster_token(read_token_file(str(path)))
        except SettingsError as e:
            print(f"raftkv token generate: {path} exists but does not hold a usable token: "
                  f"{e}. Move it away to make a new one", file=sys.stderr)
            return EXIT_USAGE
        print(f"raftkv token generate: keeping the cluster token in {path}", file=sys.stderr)
        return EXIT_OK
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"raftkv token generate: cannot create {path}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(generate_token() + "\n")
    print(f"raftkv token generate: wrote a new cluster token to {path} (mode 0600)",
          file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------- cluster
def cmd_cluster(args: argparse.Namespace) -> int:
    """Run a local cluster of `raftkv serve` processes (HTTP 4001.., Raft 5001..)."""
    from raftkv.localcluster import ClusterError, LocalCluster

    n = args.nodes
    if not 1 <= n <= 7:
        print("raftkv cluster: --nodes must be 1..7", file=sys.stderr)
        return EXIT_USAGE
    base = Path(args.data_dir)
    token = os.environ.get("RAFTKV_CLUSTER_TOKEN") or None  # None: a random one
    token_file = os.environ.get("RAFTKV_CLUSTER_TOKEN_FILE")
    if token is None and token_file:
        from raftkv.settings import read_token_file

        try:
            token = read_token_file(token_file)
        except SettingsError as e:
            print(f"raftkv cluster: {e}", file=sys.stderr)
            return EXIT_USAGE
    cluster = LocalCluster(
        base, n, host=args.host, http_port=args.http_port, raft_port=args.raft_port,
        token=token, inherit_settings=True,
        output="terminal", color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start_all()
    except (ClusterError, OSError) as e:
        print(f"raftkv cluster: {e}", file=sys.stderr)
        cluster.stop_all()
        return EXIT_FAILED
    print(f"raftkv cluster: {n} nodes, HTTP on {args.host}:{args.http_port}.."
          f"{args.http_port + n - 1}, data in {base} (kept for the next run); Ctrl-C stops",
          flush=True)
    while not stopping.is_set() and any(node.running for node in cluster.nodes):
        stopping.wait(0.5)
    code = EXIT_OK
    for nid, rc in cluster.stop_all().items():
        if rc not in (0, -signal.SIGTERM):
            print(f"raftkv cluster: {nid} exited with status {rc}", file=sys.stderr)
            code = EXIT_FAILED
    return code


# ---------------------------------------------------------------------------- client commands
class _UsageError(Exception):
    pass


def _token(args: argparse.Namespace) -> str | None:
    """--token, else --token-file, else RAFTKV_TOKEN, else RAFTKV_TOKEN_FILE; never printed."""
    if args.token:
        return str(args.token)
    path = args.token_file
    if not path and os.environ.get("RAFTKV_TOKEN"):
        return os.environ["RAFTKV_TOKEN"]
    path = path or os.environ.get("RAFTKV_TOKEN_FILE")
    if path:
        try:
            token = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise _UsageError(f"cannot read the token file {path}: "
                              f"{getattr(e, 'strerror', None) or type(e).__name__}") from None
        if not token or any(c.isspace() for c in token):
            raise _UsageError(f"the token file {path} must hold one token")
        return token
    return None


def _client_options(args: argparse.Namespace) -> dict[str, object]:
    """token and ssl_context for a Client, from the flags and the environment."""
    import ssl

    context: ssl.SSLContext | None = None
    cacert = args.cacert or os.environ.get("RAFTKV_CACERT")
    cert = args.cert or os.environ.get("RAFTKV_CERT")
    key = args.tls_key or os.environ.get("RAFTKV_KEY")
    if cacert or cert:
        try:
            context = ssl.create_default_context(cafile=cacert or None)
            if cert:
                context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as e:
            raise _UsageError(f"cannot load the TLS files: {e}") from None
    return {"token": _token(args), "ssl_context": context}


def _client(args: argparse.Namespace) -> object:
    from raftkv.client import Client

    urls = []
    for url in filter(None, args.urls.split(",")):  # "a,b," is a and b
        scheme, sep, _rest = url.partition("://")
        if sep and scheme not in ("http", "https"):
            raise _UsageError(f"{url!r}: a node URL is host:port, http://host:port or "
                              "https://host:port")
        urls.append(url if sep else f"http://{url}")
    try:
        return Client(urls, timeout_s=args.timeout,
                      **_client_options(args))  # type: ignore[arg-type]
    except ValueError as e:
        raise _UsageError(f"{e} (--urls, --timeout, --token)") from None


def _print(obj: object) -> None:
    print(json.dumps(_as_dict(obj), indent=None, sort_keys=True, default=_enum_value))


def _enum_value(obj: object) -> object:
    import enum

    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _run_client(args: argparse.Namespace) -> int:
    from raftkv import client as c

    try:
        cl = _client(args)
    except _UsageError as e:
        print(f"raftkv {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    assert isinstance(cl, c.Client)
    # The client bounds each attempt and the time it starts new ones, not a server that
    # trickles bytes: the whole command gets the retry budget plus an attempt, then exits 3.
    deadline_s = cl.retry_budget_s + args.timeout + _DEADLINE_SLACK_S
    try:
        with _deadline(deadline_s):
            return _client_command(cl, args)
    except _DeadlineReached:
        print(f"raftkv {args.command}: no complete answer within {deadline_s:g} s",
              file=sys.stderr)
        return EXIT_UNAVAILABLE


_DEADLINE_SLACK_S = 5.0


class _DeadlineReached(BaseException):
    """The command's own deadline passed (a BaseException: no `except Exception` in the
    client swallows it)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _DeadlineReached in this (main) thread after `seconds`; elsewhere nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise _DeadlineReached

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    pending, _interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:  # someone else's alarm (a test runner's timeout): give it back
            left = pending - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


def _client_command(cl: object, args: argparse.Namespace) -> int:
    from raftkv import client as c

    assert isinstance(cl, c.Client)
    try:
        if args.command == "get":
            _print(cl.get(args.key, consistency=args.consistency))
        elif args.command == "put":
            try:
                value = json.loads(args.value, parse_constant=reject_json_constant,
                                   parse_float=finite_json_float)
            except (ValueError, RecursionError):
                value = args.value  # a bare word (or NaN, 1e999) is stored as a string
            _print(cl.put(args.key, value, prev_index=args.prev_index, lease=args.lease,
                          ttl=args.ttl))
        elif args.command == "delete":
            _print(cl.delete(args.key, prev_index=args.prev_index))
        elif args.command == "status":
            if args.json:
                _print(cl.status())
            else:
                print(_clean_lines(_status_table(cl, args.timeout, _client_options(args))))
        elif args.command == "members":
            if args.action == "list":
                _print(cl.members())
            elif args.action == "add":
                if not args.address:
                    print("raftkv members add: --address is required", file=sys.stderr)
                    return EXIT_USAGE
                _print(cl.join(args.id, args.address))
            elif args.action == "promote":
                member = next((m for m in cl.members() if m.id == args.id), None)
                if member is None:
                    print(f"raftkv members promote: {args.id} is not a member", file=sys.stderr)
                    return EXIT_FAILED
                _print(cl.join(args.id, member.raft_address, voter=True))
            else:
                _print(cl.remove(args.id))
        elif args.command == "lease":
            _lease_command(cl, args.action, args.arg)
        elif args.command == "token":
            _token_command(cl, args)
        elif args.command == "alarm":
            if args.action == "list":
                _print(cl.alarms())
            else:
                _print({"disarmed": True, "index": cl.disarm_alarms()})
    except (c.KeyNotFound, c.LeaseNotFound) as e:
        _print({"error": e.code, "message": str(e)})
        return EXIT_FAILED
    except (c.Unavailable, c.OutcomeUnknown) as e:
        print(f"raftkv {args.command}: {_clean(str(e))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except c.ClientError as e:
        print(f"raftkv {args.command}: {_clean(str(e))}", file=sys.stderr)
        # Refused by the client before anything was sent (an empty key, lease 0): the
        # command line is wrong, as for argparse's own refusals.
        return EXIT_USAGE if isinstance(e, c.BadRequest) and not e.status else EXIT_FAILED
    return EXIT_OK


def _token_command(cl: object, args: argparse.Namespace) -> None:
    from raftkv import client as c
    from raftkv.auth import prefixes_text

    assert isinstance(cl, c.Client)
    if args.action == "create":
        made = cl.token_create(args.role, args.prefix or ())
        _print(made)  # the secret, this once
        print("raftkv token create: the token (its secret) is shown this once; store it now",
              file=sys.stderr)
    elif args.action == "revoke":
        _print(cl.token_revoke(args.id))
    elif args.json:
        _print(cl.tokens())
    else:
        rows = [("ID", "ROLE", "PREFIXES", "CREATED")] + [
            (t.token_id, t.role.value, prefixes_text(t.prefixes), str(t.created_index))
            for t in cl.tokens()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print(_clean("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
                         .rstrip()))


def _lease_command(cl: object, action: str, arg: int) -> None:
    from raftkv import client as c

    assert isinstance(cl, c.Client)
    if action == "grant":
        _print(cl.lease_grant(arg))
    elif action == "keepalive":
        _print(cl.lease_keepalive(arg))
    elif action == "revoke":
        _print(cl.lease_revoke(arg))
    elif action == "get":
        _print(cl.lease(arg))
    else:  # a list carries no keys (`get ID` shows them): no empty "keys" to mislead
        from dataclasses import asdict

        print(json.dumps([{k: v for k, v in asdict(lease).items() if k != "keys"}
                          for lease in cl.leases()], sort_keys=True))


# ---------------------------------------------------------------------------- lock
def cmd_lock(args: argparse.Namespace, command: list[str]) -> int:
    """Run `command` while holding the lock `args.name` (like `etcdctl lock`)."""
    from raftkv import client as c
    from raftkv.coordination import Lock

    if not command:
        print("raftkv lock: give the command to run after --: raftkv lock NAME -- command ...",
              file=sys.stderr)
        return EXIT_USAGE
    from raftkv.service import MAX_LEASE_TTL_S, MIN_LEASE_TTL_S

    if not MIN_LEASE_TTL_S <= args.ttl <= MAX_LEASE_TTL_S:
        print(f"raftkv lock: --ttl must be {MIN_LEASE_TTL_S}..{MAX_LEASE_TTL_S} seconds",
              file=sys.stderr)
        return EXIT_USAGE
    if args.wait is not None and not 0 <= args.wait < float("inf"):
        print("raftkv lock: --wait must be a number of seconds >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        cl = _client(args)
    except _UsageError as e:
        print(f"raftkv lock: {e}", file=sys.stderr)
        return EXIT_USAGE
    assert isinstance(cl, c.Client)
    child: list[subprocess.Popen[bytes]] = []
    lost = threading.Event()

    def on_lost() -> None:  # the keepalive thread
        lost.set()
        if child:
            _stop(child[0])

    try:
        lock = Lock(cl, args.name, args.ttl, on_lost=on_lost)
        token = lock.acquire(timeout_s=args.wait)
    except ValueError as e:
        print(f"raftkv lock: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (c.Unavailable, c.OutcomeUnknown) as e:
        print(f"raftkv lock: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except c.ClientError as e:
        print(f"raftkv lock: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"raftkv lock: holding {args.name} (key {lock.key}, lease {lock.lease_id}, "
          f"fencing token {token})", file=sys.stderr, flush=True)
    env = dict(os.environ, RAFTKV_LOCK_NAME=args.name, RAFTKV_LOCK_KEY=lock.key,
               RAFTKV_LOCK_LEASE=str(lock.lease_id), RAFTKV_LOCK_FENCING_TOKEN=str(token))
    # Signals to this process go to the command (only the main thread may install handlers).
    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if in_main else ()
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        try:
            child.append(subprocess.Popen(command, env=env))
        except OSError as e:
            print(f"raftkv lock: cannot run {command[0]}: {e.strerror or e}", file=sys.stderr)
            return 127 if isinstance(e, FileNotFoundError) else 126
        if lost.is_set():  # lost before the command started
            _stop(child[0])

        def forward(signum: int, _frame: FrameType | None) -> None:
            child[0].send_signal(signum)

        for sig in previous:
            signal.signal(sig, forward)
        status = child[0].wait()
        if lock.lost:
            print(f"raftkv lock: lost the lock {args.name} while the command ran (its lease "
                  "expired or was revoked); the command was stopped", file=sys.stderr)
            return EXIT_LOCK_LOST
        return status if status >= 0 else 128 - status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.release()
        cl.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM now, SIGKILL after LOCK_LOST_GRACE_S if it is still running."""
    if process.poll() is None:
        process.terminate()

        def kill() -> None:
            if process.poll() is None:
                process.kill()

        timer = threading.Timer(LOCK_LOST_GRACE_S, kill)
        timer.daemon = True
        timer.start()


def _status_table(cl: object, timeout_s: float, options: dict[str, object]) -> str:
    """The member table, through the leader's member list (raftkv.status_table)."""
    from raftkv import client as c
    from raftkv.service import NodeStatus
    from raftkv.status_table import format_table, gather_rows

    assert isinstance(cl, c.Client)
    probe_timeout_s = min(timeout_s, 2.0)

    def one(url: str) -> c.Client:
        return c.Client([url], timeout_s=probe_timeout_s, retries=0,
                        **options)  # type: ignore[arg-type]

    members = cl.members()
    leader = next((m for m in members if m.leader and m.http_address), None)
    if leader is not None and leader.http_address:
        try:
            with one(leader.http_address) as at_leader:
                members = at_leader.members()
        except c.ClientError:
            pass  # the first answer will do

    def fetch(url: str) -> NodeStatus:
        with one(url) as node:
            return node.status()

    return format_table(gather_rows(members, fetch))


# ---------------------------------------------------------------------------- backup, restore
def cmd_backup(args: argparse.Namespace) -> int:
    import http.client

    from raftkv import client as c
    from raftkv.runtime.backup import BackupError, BackupHeader, utc_timestamp, write_backup

    try:
        cl = _client(args)
    except _UsageError as e:
        print(f"raftkv backup: {e}", file=sys.stderr)
        return EXIT_USAGE
    assert isinstance(cl, c.Client)
    try:
        with cl.download_snapshot(args.consistency) as download:
            header = BackupHeader(download.index, download.length_bytes, download.checksum,
                                  download.checksum_algorithm, download.url, utc_timestamp())
            write_backup(args.file, header, download.chunks)
    except (c.Unavailable, c.OutcomeUnknown, http.client.HTTPException, ConnectionError,
            TimeoutError) as e:
        print(f"raftkv backup: {e}; nothing was written", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (c.ClientError, BackupError) as e:
        print(f"raftkv backup: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"raftkv backup: cannot write {args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"raftkv backup: wrote {args.file}: index {header.index}, {header.length_bytes} "
          f"bytes, {header.checksum_algorithm} {header.checksum}, from {header.source}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from raftkv.ports import StorageError
    from raftkv.runtime.backup import BackupError, RestoreError, restore

    if not args.id or not args.data_dir:
        print("raftkv restore: --id and --data-dir are required (or RAFTKV_ID, "
              "RAFTKV_DATA_DIR)", file=sys.stderr)
        return EXIT_USAGE
    try:
        r = restore(args.file, args.data_dir, args.id, args.raft_addr)
    except RestoreError as e:
        print(f"raftkv restore: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (BackupError, StorageError) as e:
        print(f"raftkv restore: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"raftkv restore: {e.strerror or e}: {e.filename or args.data_dir}",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"raftkv restore: {args.file} -> {r.data_dir}: node {r.node_id} (raft address "
          f"{r.raft_address}) of a new cluster {r.cluster_id}, index {r.index}, {r.keys} keys.\n"
          f"Start it with: raftkv serve --data-dir {r.data_dir} --id {r.node_id} --raft-addr "
          f"{r.raft_address} --http-addr HOST:PORT and a cluster token of its own "
          f"(RAFTKV_CLUSTER_TOKEN_FILE, from `raftkv token generate`); add nodes with "
          f"RAFTKV_JOIN=HOST:PORT and the same token")
    return EXIT_OK


def cmd_certs(args: argparse.Namespace) -> int:
    from raftkv.certs import CertsError, init_certs

    if not args.dir.strip():
        print("raftkv certs init: give the directory to write into", file=sys.stderr)
        return EXIT_USAGE
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
    try:
        made = init_certs(args.dir, nodes, hosts, days=args.days)
    except (CertsError, ValueError) as e:  # ValueError: a name a certificate cannot carry
        print(f"raftkv certs init: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"raftkv certs init: {e.strerror or e}: {e.filename or args.dir}", file=sys.stderr)
        return EXIT_FAILED
    print(f"raftkv certs init: wrote {', '.join(made.files)} in {made.directory} (keys mode "
          "0600; ca.key signs new certificates: keep it off the nodes)")
    return EXIT_OK


def _as_dict(obj: object) -> object:
    """Dataclasses (also inside lists) as plain JSON values."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        fields = asdict(obj)
        if "lease" in fields and fields["lease"] is None:
            del fields["lease"]  # a key without a lease prints as it did before leases
        return fields
    if isinstance(obj, list | tuple):
        return [_as_dict(x) for x in obj]
    return obj


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raftkv", description="raftkv: a durable key-value store replicated with Raft. "
        "`raftkv serve` runs a node, `raftkv cluster` a local cluster; the other commands "
        "talk to a cluster (`raftkv COMMAND --help`).")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one node (settings as flags or RAFTKV_* env)")
    add_arguments(serve)

    cluster = sub.add_parser("cluster", help="run a local cluster of processes")
    cluster.add_argument("--nodes", type=int, default=3)
    cluster.add_argument("--host", default="127.0.0.1")
    cluster.add_argument("--http-port", type=int, default=4001)
    cluster.add_argument("--raft-port", type=int, default=5001)
    cluster.add_argument("--data-dir", default="data/cluster")

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--urls", default=os.environ.get(
            "RAFTKV_URLS", "127.0.0.1:4001,127.0.0.1:4002,127.0.0.1:4003"),
            help="comma-separated node HTTP addresses [RAFTKV_URLS]")
        sp.add_argument("--timeout", type=float, default=5.0)
        sp.add_argument("--token", default=None,
                        help="token for a cluster with auth (visible in ps: prefer "
                             "--token-file or RAFTKV_TOKEN) [RAFTKV_TOKEN]")
        sp.add_argument("--token-file", default=None,
                        help="file holding the token [RAFTKV_TOKEN_FILE]")
        sp.add_argument("--cacert", default=None,
                        help="CA certificate for https:// URLs [RAFTKV_CACERT]")
        sp.add_argument("--cert", default=None,
                        help="client certificate for https:// URLs [RAFTKV_CERT]")
        sp.add_argument("--key", dest="tls_key", default=None,
                        help="the client certificate's key [RAFTKV_KEY]")

    get = sub.add_parser("get", help="read a key")
    get.add_argument("key")
    get.add_argument("--consistency", default="linearizable",
                     choices=["linearizable", "leader", "stale"])
    client_args(get)
    put = sub.add_parser("put", help="write a key (value as JSON, or a bare string)")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--prev-index", type=int, default=None)
    put.add_argument("--lease", type=int, default=None,
                     help="attach the key to this lease (its keys go when it ends)")
    put.add_argument("--ttl", type=int, default=None,
                     help="give the key a lease of its own of TTL seconds")
    client_args(put)
    delete = sub.add_parser("delete", help="delete a key")
    delete.add_argument("key")
    delete.add_argument("--prev-index", type=int, default=None)
    client_args(delete)
    status = sub.add_parser("status", help="a table of the members and their state")
    status.add_argument("--json", action="store_true",
                        help="print the status of one node (the first that answers) as JSON")
    client_args(status)
    members = sub.add_parser("members", help="list, add or remove members")
    members.add_argument("action", choices=["list", "add", "promote", "remove"], nargs="?",
                         default="list",
                         help="add joins as a learner, promoted automatically once caught up; "
                              "promote makes a learner a voter now")
    members.add_argument("id", nargs="?")
    members.add_argument("--address", help="raft address host:port of the new member (it must "
                         "answer there as ID: the join is probed)")
    client_args(members)
    lease = sub.add_parser(
        "lease", help="grant TTL | keepalive ID | revoke ID | get ID | list: leases, whose "
                      "keys are deleted when they expire or are revoked")
    lease.add_argument("action", choices=["grant", "keepalive", "revoke", "get", "list"])
    lease.add_argument("arg", nargs="?", type=int, metavar="TTL|ID",
                       help="grant: the TTL in seconds; keepalive, revoke, get: the lease id")
    client_args(lease)
    alarm = sub.add_parser(
        "alarm", help="list | disarm: the cluster's NOSPACE alarms (raised when the data "
                      "reaches the quota or a node's disk is full; writes that add data get "
                      "507 until disarmed)")
    alarm.add_argument("action", choices=["list", "disarm"], nargs="?", default="list")
    client_args(alarm)
    lock = sub.add_parser(
        "lock", help="run a command while holding a lock: raftkv lock NAME -- command ...",
        description="Wait for the lock NAME, run the command while holding it (its fencing "
                    "token is in RAFTKV_LOCK_FENCING_TOKEN), release it, and exit with the "
                    "command's status; if the lock is lost meanwhile, stop the command and "
                    "exit 4.")
    lock.add_argument("name")
    lock.add_argument("--ttl", type=int, default=10,
                      help="the lock's lease in seconds: how long the lock outlives this "
                           "process if it dies (default 10)")
    lock.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                      help="give up (exit 1) if the lock is not free within SECONDS")
    client_args(lock)
    token = sub.add_parser(
        "token", help="generate | create | list | revoke: a cluster token; tokens of a "
                      "cluster with auth (admin)",
        description="generate [--file PATH]: make a cluster token (RAFTKV_CLUSTER_TOKEN), "
                    "locally; create --role read|write|admin [--prefix P ...]: make a client "
                    "token and print its secret, this once; list: ids, roles, prefixes, "
                    "creation indices; revoke ID: every node refuses it once applied.")
    token.add_argument("action", choices=["generate", "create", "list", "revoke"])
    token.add_argument("--file", help="generate: keep the token in this file (mode 0600), "
                                      "made only if it does not exist; serve it with "
                                      "RAFTKV_CLUSTER_TOKEN_FILE")
    token.add_argument("id", nargs="?", help="revoke: the token's id")
    token.add_argument("--role", choices=["read", "write", "admin"],
                       help="create: what the token may do")
    token.add_argument("--prefix", action="append", metavar="PREFIX",
                       help="create: limit the token to keys starting with PREFIX (repeat for "
                            "more); none: every key")
    token.add_argument("--json", action="store_true", help="list: as JSON")
    client_args(token)
    certs = sub.add_parser(
        "certs", help="init DIR --nodes n1,n2,n3: a CA and node and client certificates",
        description="Make a CA (ca.pem, ca.key), a certificate per node for both ends of "
                    "mutual TLS (<node>.pem, <node>.key) and a client certificate (client.pem, "
                    "client.key) in DIR. Needs the cryptography package (raftkv[tls]).")
    certs.add_argument("action", choices=["init"])
    certs.add_argument("dir", metavar="DIR")
    certs.add_argument("--nodes", required=True, help="node ids, comma-separated")
    certs.add_argument("--hosts", default="",
                       help="extra DNS names or IP addresses for every node certificate, "
                            "comma-separated (localhost, 127.0.0.1 and ::1 are always in)")
    certs.add_argument("--days", type=int, default=825, help="validity of the leaf "
                       "certificates (default 825)")
    backup = sub.add_parser("backup", help="download a consistent snapshot into FILE")
    backup.add_argument("file", metavar="FILE")
    backup.add_argument("--consistency", default="linearizable",
                        choices=["linearizable", "leader", "stale"])
    client_args(backup)
    restore = sub.add_parser(
        "restore", help="seed an empty data dir with a new one-node cluster from a backup")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--data-dir", default=os.environ.get("RAFTKV_DATA_DIR"),
                         help="the new node's data dir: absent or empty [RAFTKV_DATA_DIR]")
    restore.add_argument("--id", default=os.environ.get("RAFTKV_ID"),
                         help="the new node's name, e.g. n1 [RAFTKV_ID]")
    restore.add_argument("--raft-addr", default=os.environ.get(
        "RAFTKV_RAFT_ADVERTISE", os.environ.get("RAFTKV_RAFT_ADDR", "127.0.0.1:5001")),
        help="the peer address the node will be reached at, as given to serve "
             "[RAFTKV_RAFT_ADVERTISE, RAFTKV_RAFT_ADDR]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a server's odd text never ends a print
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["lock"] and "--" in argv:  # everything after -- is the command, verbatim
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    undecodable = next((a for a in argv if not _is_text(a)), None)
    if undecodable is not None:
        print(f"raftkv {args.command}: the argument {undecodable!a} is not UTF-8 text",
              file=sys.stderr)
        return EXIT_USAGE
    if args.command in ("serve", "cluster"):
        return _dispatch(args, command)
    try:
        return _dispatch(args, command)
    except Exception as e:  # a bug, or an answer this client did not foresee: no traceback
        print(f"raftkv {args.command}: unexpected {type(e).__name__}: {_clean(str(e))[:300]}",
              file=sys.stderr)
        return EXIT_FAILED


def _is_text(arg: str) -> bool:
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the command line (surrogateescape)
        return False
    return True


def _clean(text: str) -> str:
    """`text` with control characters escaped (a server's message goes to a terminal)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _clean_lines(text: str) -> str:
    return "\n".join(_clean(line) for line in text.split("\n"))


def _token_usage_problem(args: argparse.Namespace) -> str:
    """What is wrong with a `raftkv token` command line ("" when nothing): each option
    belongs to one action, and one given to another would be silently ignored."""
    action = args.action
    if action == "create" and not args.role:
        return "--role is required"
    if action == "revoke" and not args.id:
        return "a token id is required"
    for given, option, owner in ((args.role, "--role", "create"),
                                 (args.prefix, "--prefix", "create"),
                                 (args.file, "--file", "generate"),
                                 (args.id, "a token id", "revoke"),
                                 (args.json, "--json", "list")):
        if given and action != owner:
            return f"{option} is for {owner}"
    return ""


def _dispatch(args: argparse.Namespace, command: list[str]) -> int:
    if args.command == "lock":
        return cmd_lock(args, command)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "cluster":
        return cmd_cluster(args)
    if args.command == "token":
        problem = _token_usage_problem(args)
        if problem:
            print(f"raftkv token {args.action}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if args.action == "generate":
            return cmd_token(args)
    if args.command == "backup":
        return cmd_backup(args)
    if args.command == "certs":
        return cmd_certs(args)
    if args.command == "restore":
        return cmd_restore(args)
    if args.command == "members" and args.action in ("add", "promote", "remove") and not args.id:
        print(f"raftkv members {args.action}: a node id is required", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "lease" and (args.arg is None) != (args.action == "list"):
        what = "no argument" if args.action == "list" else (
            "a TTL in seconds" if args.action == "grant" else "a lease id")
        print(f"raftkv lease {args.action}: takes {what}", file=sys.stderr)
        return EXIT_USAGE
    return _run_client(args)


if __name__ == "__main__":
    sys.exit(main())
