"""Where the server listens: the loopback rule, the socket, and a server in a background thread.

Binding the socket ourselves (instead of letting uvicorn do it) turns a port in use into one
line that says what to do, and lets tests and benchmarks ask for port 0 and read the port the
system chose.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from adapterkit.errors import ConfigError

__all__ = ["bind", "check_exposure", "is_loopback", "running"]


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``: reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless the user says ``--insecure``:
    an open server lets anyone on the network use the GPU and read the library's names."""
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key must not be empty")
    if is_loopback(host) or api_key or insecure:
        return
    raise ConfigError(
        f"--host {host} is reachable from other machines: give --api-key KEY (or set "
        "ADAPTERKIT_API_KEY) so only clients with the key are answered, or --insecure to serve "
        "without one")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port the system picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use (another server?); pick another "
                              "with --port") from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"cannot listen on {host}: not an address of this machine "
                              f"({exc.strerror or exc})") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"port {port} needs privileges; use a port above 1023") from None
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, *,
            log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL.

    For tests and benchmarks: the real server on a real socket, stopped on exit.
    """
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="adapterkit-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
