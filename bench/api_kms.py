"""The KMS over HTTPS: encrypt-data (4 KB) and create-datakey through ``dew api``,
beside two floors measured in the same run.

- ``api``: a real ``dew api`` process (TLS, AK/SK signature check, identity
  lookup and SK unsealing in the HSM, permission check, rate limit in Redis,
  the KMS call, JSON) driven by an async client (aiohttp) that signs its own
  requests (SDK-HMAC-SHA256, HUAWEI_API.md §3), at concurrency 1, 16 and 64.
- ``echo``: a bare JSON echo endpoint on the same server stack (Starlette on
  uvicorn, uvloop + httptools, the same TLS certificate), same client, same body.
- ``in-process``: the same ``KmsService`` call from asyncio tasks in this process.

The composed floor is ``1 / (1/echo + 1/in_process)``: what the HTTP stack and
the service cost one after the other, with nothing of ours in between. Goal at
concurrency 16: api >= 0.8 x composed, p99 under 50 ms.

    .venv/bin/python bench/api_kms.py [--seconds 3] [--concurrency 1,16,64]

Client and servers share the machine's cores (2 here): read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from engine.redis_server import RedisServer, free_port  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402

PLAIN_4K = "x" * 4096


# --------------------------------------------------------------------------- signing

def sign_headers(method: str, url: str, body: bytes, ak: str, sk: str,
                 project_id: str) -> dict[str, str]:
    """The headers the official SDK sends, signed as it signs them (§3)."""
    parsed = urlsplit(url)
    date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {"content-type": "application/json;charset=UTF-8",
               "host": parsed.netloc, "x-project-id": project_id, "x-sdk-date": date}
    segments = unquote(parsed.path).split("/")
    uri = "/".join(quote(s, safe="~") for s in segments)
    uri = uri if uri.endswith("/") else uri + "/"
    names = sorted(headers)
    canonical = "\n".join([
        method, uri, "", "".join(f"{n}:{headers[n].strip()}\n" for n in names),
        ";".join(names), hashlib.sha256(body).hexdigest()])
    to_sign = f"SDK-HMAC-SHA256\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(sk.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"SDK-HMAC-SHA256 Access={ak}, SignedHeaders={';'.join(names)}, "
                                f"Signature={signature}")
    return headers


# --------------------------------------------------------------------------- the echo server

def echo_server(port: int, cert: str, key: str) -> None:
    """A bare JSON echo on the API's own server stack (run in a child process)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(json.loads(await request.body()))

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                ssl_certfile=cert, ssl_keyfile=key, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- measuring

async def drive(concurrency: int, seconds: float,
                call: Callable[[], Awaitable[None]]) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of ``concurrency`` callers looping for ``seconds``."""
    for _ in range(min(concurrency, 8)):
        await call()  # warm-up: connections open, caches fill
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000


def http_call(client: aiohttp.ClientSession, url: str, body: dict[str, Any],
              ident: tuple[str, str, str] | None) -> Callable[[], Awaitable[None]]:
    data = json.dumps(body).encode()

    async def call() -> None:
        headers = (sign_headers("POST", url, data, *ident) if ident
                   else {"content-type": "application/json"})
        async with client.post(url, data=data, headers=headers) as reply:
            text = await reply.read()
            if reply.status != 200:
                raise SystemExit(f"{url}: {reply.status} {text[:300]!r}")

    return call


# --------------------------------------------------------------------------- setup

def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


async def make_identity(settings: Settings) -> tuple[str, str, str]:
    from engine.iam.service import Identities

    ids = await Identities.open(settings)
    try:
        project = await ids.project("default")
        assert project is not None
        await ids.create_user("bench", project.name, roles=["KMS Administrator"])
        key, secret = await ids.create_access_key("bench")
        return key.access_key, secret, project.project_id
    finally:
        await ids.close()


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
    env.update({"DEW_STATE_DIR": str(settings.state_dir), "DEW_REDIS_URL": settings.redis.url,
                "DEW_LOG_CONSOLE": "off", "DEW_LOG_LEVEL": "warning", **extra})
    return env


async def in_process(settings: Settings, key_id: str, concurrency: int,
                     seconds: float) -> dict[str, float]:
    from handlers.kms.wiring import open_kms

    plain = PLAIN_4K.encode()
    async with open_kms(settings, actor="bench") as kms:
        enc = await drive(concurrency, seconds, lambda: kms.encrypt_data(key_id, plain))
        dk = await drive(concurrency, seconds, lambda: kms.create_datakey(key_id, 256))
    return {"encrypt-data": enc[0], "create-datakey": dk[0]}


async def main_async(args: argparse.Namespace) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", port=free_port())
        redis.start()
        settings = load_settings().replace(engine={"state_dir": Path(tmp) / "var"},
                                           redis={"url": redis.url})
        procs: list[subprocess.Popen[bytes]] = []
        try:
            subprocess.run([sys.executable, "-m", "engine.cli", "init"], env=env_of(settings),
                           check=True, stdout=subprocess.DEVNULL)
            ak, sk, project_id = await make_identity(settings)
            api_port, echo_port = free_port(), free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "api"], cwd=ROOT,
                env=env_of(settings, DEW_API_LISTEN=f"127.0.0.1:{api_port}",
                           DEW_API_RATE_CRYPTO="1000000/second",
                           DEW_API_RATE_MANAGE="1000000/second"),
                stdout=subprocess.DEVNULL))
            wait_port(api_port, procs[-1])
            tls = settings.state_dir / "tls"
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--echo-server", str(echo_port),
                 str(tls / "server.pem"), str(tls / "server-key.pem")], cwd=ROOT))
            wait_port(echo_port, procs[-1])

            ident = (ak, sk, project_id)
            base = f"https://127.0.0.1:{api_port}/v1.0/{project_id}/kms"
            tls_context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
            connector = aiohttp.TCPConnector(ssl=tls_context, limit=max(levels))
            async with aiohttp.ClientSession(connector=connector) as client:
                create = json.dumps({"key_alias": "bench"}).encode()
                async with client.post(f"{base}/create-key", data=create, headers=sign_headers(
                        "POST", f"{base}/create-key", create, *ident)) as made:
                    key_id = (await made.json(content_type=None))["key_info"]["key_id"]
                bodies = {
                    "encrypt-data": {"key_id": key_id, "plain_text": PLAIN_4K},
                    "create-datakey": {"key_id": key_id, "datakey_length": "256"},
                }
                rows = []
                for level in levels:
                    local = await in_process(settings, key_id, level, args.seconds)
                    for op, body in bodies.items():
                        api = await drive(level, args.seconds,
                                          http_call(client, f"{base}/{op}", body, ident))
                        echo = await drive(level, args.seconds, http_call(
                            client, f"https://127.0.0.1:{echo_port}/echo", body, None))
                        composed = 1 / (1 / echo[0] + 1 / local[op])
                        rows.append((op, level, api, echo, local[op], composed))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(20)
            redis.stop()

    print(f"{'operation':15} {'conc':>4} {'api req/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'echo req/s':>10} {'in-proc/s':>10} {'composed':>9} {'api/composed':>12}")
    for op, level, api, echo, local, composed in rows:
        print(f"{op:15} {level:>4} {api[0]:>10,.0f} {api[1]:>7.1f} {api[2]:>7.1f} "
              f"{echo[0]:>10,.0f} {local:>10,.0f} {composed:>9,.0f} {api[0] / composed:>12.2f}")
    print("\ncomposed = 1/(1/echo + 1/in-process); goal at concurrency 16: api/composed >= 0.8 "
          "and p99 < 50 ms")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--echo-server":
        echo_server(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16,64")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
