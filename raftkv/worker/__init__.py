"""An HTTP worker process of a node: waitress and the Falcon app, in front of the Raft process.

    channel.py   the worker's end of its channel to the Raft process
    service.py   RemoteService: the KVService over that channel
    __main__.py  the process: `python -m raftkv.worker CONFIG` (started by raftkv.runtime)

A worker holds no state of the node: it parses, validates, encodes and waits; the Raft
process decides. It serves requests as greenlets on waitress's loop (raftkv.http.green).
"""
