"""Networking disabled for a Python process: every IPv4/IPv6 connection and name lookup raises.

Used three ways:

* the reliability suite's ``conftest.py`` installs it for the whole ``tests/reliability`` package;
* the fork server installs it before forking, so every CLI run the suite kills or compares is offline too;
* ``PYTHONPATH=tests/reliability/nonet`` installs it in every Python process started with that path (pytest,
  snakemake and the ``epd`` jobs it spawns), e.g. ``PYTHONPATH=tests/reliability/nonet bash scripts/smoke.sh``;
  ``pytest -p tests.reliability.offline`` does the same for one pytest process.

Unix-domain sockets and loopback (``localhost``, 127.0.0.0/8, ::1: a local MLflow server, ``torch.distributed``
rendezvous on one host) stay usable: they are not the network. Every blocked attempt is also recorded in
:data:`ATTEMPTS`, so a library that catches the error and silently falls back is still caught by the tests.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["NetworkDisabled", "ATTEMPTS", "install", "uninstall", "installed"]

ATTEMPTS: list[str] = []
_ORIGINAL: dict[str, object] = {}
_BLOCKED_FAMILIES = {socket.AF_INET, socket.AF_INET6}


class NetworkDisabled(OSError):
    """Raised instead of opening a network connection or resolving a host name."""


def _refuse(what: str):
    ATTEMPTS.append(what)
    raise NetworkDisabled(f"network access attempted ({what}) while networking is disabled for this process; "
                          "epd must run offline (weights come from local paths only)")


def _loopback(host) -> bool:
    if host in (None, "", "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host)).is_loopback
    except ValueError:
        return False


def _connect(self, address, *a, **k):
    if self.family in _BLOCKED_FAMILIES and not _loopback(address[0]):
        _refuse(f"socket.connect{address!r}")
    return _ORIGINAL["connect"](self, address, *a, **k)


def _connect_ex(self, address, *a, **k):
    if self.family in _BLOCKED_FAMILIES and not _loopback(address[0]):
        _refuse(f"socket.connect_ex{address!r}")
    return _ORIGINAL["connect_ex"](self, address, *a, **k)


def _create_connection(address, *a, **k):
    if not _loopback(address[0]):
        _refuse(f"socket.create_connection{address!r}")
    return _ORIGINAL["create_connection"](address, *a, **k)


def _getaddrinfo(host, *a, **k):
    if not _loopback(host):
        _refuse(f"socket.getaddrinfo({host!r})")
    return _ORIGINAL["getaddrinfo"](host, *a, **k)


def _gethostbyname(host, *a, **k):
    if not _loopback(host):
        _refuse(f"socket.gethostbyname({host!r})")
    return _ORIGINAL["gethostbyname"](host, *a, **k)


def installed() -> bool:
    return bool(_ORIGINAL)


def install() -> None:
    """Patch the socket module (idempotent)."""
    if _ORIGINAL:
        return
    _ORIGINAL.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                     create_connection=socket.create_connection, getaddrinfo=socket.getaddrinfo,
                     gethostbyname=socket.gethostbyname)
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.create_connection = _create_connection
    socket.getaddrinfo = _getaddrinfo
    socket.gethostbyname = _gethostbyname


def uninstall() -> None:
    """Restore the socket module."""
    if not _ORIGINAL:
        return
    socket.socket.connect = _ORIGINAL["connect"]
    socket.socket.connect_ex = _ORIGINAL["connect_ex"]
    socket.create_connection = _ORIGINAL["create_connection"]
    socket.getaddrinfo = _ORIGINAL["getaddrinfo"]
    socket.gethostbyname = _ORIGINAL["gethostbyname"]
    _ORIGINAL.clear()


def pytest_configure(config):  # ``pytest -p tests.reliability.offline``: the whole session offline
    install()
