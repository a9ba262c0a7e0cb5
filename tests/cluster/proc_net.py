"""Which process holds the server end of a client's TCP connection, and whether it has read
what the client sent: from /proc/net/tcp and /proc/<pid>/fd (Linux). The cluster tests use it
to act on the HTTP worker that serves a given request."""

from __future__ import annotations

import http.client
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ServerEnd:
    inode: int
    rx_queue: int
    """Bytes the client sent that the server has not read yet."""


def _hex_address(host: str, port: int) -> str:
    packed = socket.inet_aton(host)
    return f"{struct.unpack('<I', packed)[0]:08X}:{port:04X}"


def server_end(client: socket.socket) -> ServerEnd | None:
    """The server end of `client`'s connection (an IPv4 loopback connection), if it exists."""
    local_host, local_port = client.getsockname()[:2]
    peer_host, peer_port = client.getpeername()[:2]
    want_local = _hex_address(peer_host, peer_port)
    want_remote = _hex_address(local_host, local_port)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_remote:
            rx_queue = int(fields[4].split(":")[1], 16)
            return ServerEnd(int(fields[9]), rx_queue)
    return None


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` has open (empty if it is gone)."""
    found: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def holder(client: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the server end of `client`'s connection and has read everything
    the client sent on it; None while no process does (not accepted or not read yet)."""
    end = server_end(client)
    if end is None or end.rx_queue != 0 or end.inode == 0:
        return None
    for pid in pids:
        if end.inode in socket_inodes(pid):
            return pid
    return None


def holder_of(conn: http.client.HTTPConnection, pids: list[int]) -> Callable[[], int | None]:
    """A wait_until condition: holder() of `conn`'s socket among `pids`, read anew at each
    call."""
    return lambda: holder(conn.sock, pids)


def pid_alive(pid: int) -> bool:
    """Is `pid` a live process (not a zombie)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
