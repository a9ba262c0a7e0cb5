"""The JSON HTTP API of a raftkv node: a Falcon app over a KVService, served by waitress."""

from raftkv.http.app import DEFAULT_MAX_BODY_BYTES, create_app
from raftkv.http.server import ServerHandle, serve

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerHandle", "create_app", "serve"]
