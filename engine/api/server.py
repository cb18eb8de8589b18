"""``dew api``: uvicorn (uvloop, httptools) serving :func:`engine.api.app.build_app`.

The TLS files are prepared and the socket bound before uvicorn starts, so a bad
configuration or a taken port is one line, not a traceback. Logging is ours
(structlog; uvicorn's own lines go through it, its access log is off: the
dispatcher writes one line per request). SIGTERM and SIGINT stop the server
gracefully: calls in progress finish, then the resources close (the KMS seals
its last audit batch).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from engine.api.app import build_app
from engine.api.tls import Transport, prepare
from engine.errors import BackendUnavailable, ConfigError
from engine.settings import Settings, parse_listen

GRACEFUL_SECONDS = 10  # calls in progress get this long at shutdown, then are cancelled
IDLE_GRACE = 0.5  # seconds idle keep-alive connections get to close at shutdown
GIL_SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005); see serve()
AUTO_DATA_PROCESSES = 1  # hsm.data_processes = -1 (auto) in the API


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as exc:
        raise ConfigError(f"api.listen: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", "[::]"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BackendUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}",
                                 fix="Choose another [api] listen (or `dew api --listen`), "
                                 "or stop what holds that port.") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Starlette, transport: Transport, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=transport.host, port=transport.port, loop="uvloop", http="httptools",
        ws="none", lifespan="on", log_config=None, access_log=False, server_header=False,
        proxy_headers=False,
        ssl_certfile=str(transport.cert_file) if transport.cert_file else None,
        ssl_keyfile=str(transport.key_file) if transport.key_file else None,
        timeout_graceful_shutdown=GRACEFUL_SECONDS, **options,
    )


def describe(transport: Transport, port: int) -> str:
    """The one line ``dew api`` prints once it listens."""
    if transport.cert_file is None:
        where = "plain HTTP, loopback only"
    elif transport.ca_file is not None:
        where = f"CA: {_shown(transport.ca_file)}"
    else:
        where = f"certificate: {_shown(transport.cert_file)}"
    return f"dew api listening on {transport.url(port)} ({where})"


def _shown(path: os.PathLike[str]) -> str:
    text = os.fspath(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:
        return text
    return relative if not relative.startswith("..") else text


class ApiServer(uvicorn.Server):
    """uvicorn's server that prints ``line`` once it listens, and closes idle
    keep-alive connections at shutdown instead of waiting on them: over TLS an
    idle client never answers the close (its close_notify), and uvicorn would wait
    the whole graceful timeout for it."""

    def __init__(self, config: uvicorn.Config, line: str | None = None) -> None:
        super().__init__(config)
        self.line = line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.line:
            print(self.line, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has stopped, so the process dies of
        # it (-15); a SIGTERM is the ordinary way to stop `dew api`: exit 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        reaper = asyncio.create_task(self._close_idle())
        try:
            await super().shutdown(sockets)
        finally:
            reaper.cancel()

    async def _close_idle(self) -> None:
        await asyncio.sleep(IDLE_GRACE)
        while True:
            for connection in list(self.server_state.connections):
                cycle = getattr(connection, "cycle", None)
                transport = getattr(connection, "transport", None)
                if transport is not None and (cycle is None or cycle.response_complete):
                    transport.abort()
            await asyncio.sleep(0.1)


def auto_data_processes(cpus: int) -> int:
    """``hsm.data_processes = -1`` in the API: one data process where a second CPU can
    run it beside the event loop; none on one CPU, where it would only add its
    hand-off to every call (it adds ~5% CPU per operation)."""
    return AUTO_DATA_PROCESSES if cpus >= 2 else 0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def serve(settings: Settings, listen: str | None = None) -> int:
    """Run the API in the foreground until SIGTERM / SIGINT; the exit code."""
    host, port = parse_listen(listen or settings.api.listen)
    if settings.hsm.data_processes < 0:
        # auto: the API is where data keys are asked for at a rate (engine/crypto/_lane.py)
        settings = settings.replace(hsm={"data_processes": auto_data_processes(usable_cpus())})
    transport = prepare(settings, host, port)
    app = build_app(settings)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = ApiServer(uvicorn_config(app, transport), describe(transport, bound_port))
    # Every call hops to an HSM or store thread and back; with the default 5 ms switch
    # interval a returning thread waits for the busy event loop to give up the GIL.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits this way when the lifespan start fails
        code = exc.code if isinstance(exc.code, int) else 1
        if code:
            sys.stderr.write("dew: error: the API did not start; see the log "
                             f"{settings.log_file}\n")
        return code
    finally:
        sock.close()
    return 0 if server.started else 1
