"""The OIP gateway process: ``python -m packratd.oip --daemon ENDPOINT [--http ADDR:PORT] [--grpc ADDR:PORT] ...``

One asyncio loop, one thread of Python: tornado's HTTP server and grpc.aio's server share the loop
with the DEALER to packratd (:mod:`.link`).  A separate process from the daemon so that HTTP parsing,
JSON and gRPC's threads never take time from the daemon's main loop, and so that a crash here cannot
take the daemon down (docs/protocol.md, "Open Inference Protocol").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import time

from . import is_loopback, parse_listen

log = logging.getLogger("packratd.oip")

GRPC_SLACK_BYTES = 1 << 20         # gRPC message framing and metadata beyond the tensor bytes
GRPC_EXTRA_RPCS = 16
HTTP_CHUNK_BYTES = 1 << 20          # body bytes per read and per data_received (tornado's default: 64 KiB)
STOP_GRACE_S = 5.0


class StartupError(Exception):
    pass


def _ssl_context(args) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(args.tls_client_ca)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"TLS: cannot load {args.tls_cert} / {args.tls_key}: {e}") from None
    return ctx


def _grpc_credentials(args):
    import grpc
    try:
        with open(args.tls_key, "rb") as f:
            key = f.read()
        with open(args.tls_cert, "rb") as f:
            cert = f.read()
        ca = None
        if args.tls_client_ca:
            with open(args.tls_client_ca, "rb") as f:
                ca = f.read()
    except OSError as e:
        raise StartupError(f"TLS: {e}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(args, stop: asyncio.Event | None = None) -> None:
    import tornado.httpserver
    import tornado.netutil

    from .link import DaemonLink
    from .rest import MAX_JSON_BYTES, RestApp
    from .service import Service

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link = DaemonLink(args.daemon)
    svc = Service(link, args.model_name, args.max_message_bytes, request_timeout_s=args.request_timeout,
                  health_timeout_s=args.health_timeout, max_inflight=args.max_inflight)
    tls = bool(args.tls_cert)
    ports: dict[str, int] = {}
    http_server = grpc_server = None
    try:
        if args.http:
            host, port = parse_listen(args.http)
            try:
                sockets = tornado.netutil.bind_sockets(port, host)
            except OSError as e:
                raise StartupError(f"REST: cannot listen on {args.http}: {e}") from None
            http_server = tornado.httpserver.HTTPServer(
                RestApp(svc), ssl_options=_ssl_context(args) if tls else None, decompress_request=False,
                max_header_size=64 << 10, max_body_size=args.max_message_bytes + MAX_JSON_BYTES,
                idle_connection_timeout=300, body_timeout=120, chunk_size=HTTP_CHUNK_BYTES)
            http_server.add_sockets(sockets)
            ports["http"] = sockets[0].getsockname()[1]
            _warn_plain("REST", host, tls)
        if args.grpc:
            import grpc
            from .grpc_api import GrpcApi
            host, port = parse_listen(args.grpc)
            limit = min(args.max_message_bytes + GRPC_SLACK_BYTES, 2**31 - 1)
            grpc_server = grpc.aio.server(
                options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1),
                         ("grpc.so_reuseport", 0)],
                # Headroom over the gateway's own admission (503 / UNAVAILABLE) for health and metadata calls;
                # beyond it grpc answers RESOURCE_EXHAUSTED before a message is read.
                maximum_concurrent_rpcs=args.max_inflight + GRPC_EXTRA_RPCS)
            grpc_server.add_generic_rpc_handlers((GrpcApi(svc).handler(),))
            addr = _hostport(host, port)
            try:
                bound = (grpc_server.add_secure_port(addr, _grpc_credentials(args)) if tls
                         else grpc_server.add_insecure_port(addr))
            except RuntimeError as e:
                raise StartupError(f"gRPC: cannot listen on {args.grpc}: {e}") from None
            if not bound:
                raise StartupError(f"gRPC: cannot listen on {args.grpc}")
            await grpc_server.start()
            ports["grpc"] = bound
            _warn_plain("gRPC", host, tls)
        log.info("OIP gateway for %s (model %r): %s", args.daemon, args.model_name,
                 ", ".join(f"{k} on port {v}{' (TLS)' if tls else ''}" for k, v in ports.items()))
        if args.ports_file:
            _write_atomic(args.ports_file, json.dumps(dict(ports, pid=os.getpid())))
        watch = asyncio.ensure_future(_watch_parent(args.parent_pid, stop)) if args.parent_pid else None
        await stop.wait()
        if watch is not None:
            watch.cancel()
        log.info("stopping: %d request(s) in flight", svc.inflight)
        if http_server is not None:
            http_server.stop()                  # no new connections
        if grpc_server is not None:
            await grpc_server.stop(STOP_GRACE_S)
        deadline = time.monotonic() + STOP_GRACE_S
        while svc.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if http_server is not None:
            await http_server.close_all_connections()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(0)
        link.close()


def _warn_plain(what: str, host: str, tls: bool) -> None:
    if not tls and not is_loopback(host):
        log.warning("%s listens on %s without TLS or authentication: anyone who reaches the port can use the model "
                    "and read its answers; put a TLS-terminating proxy in front or set oip.tls_cert/oip.tls_key",
                    what, host)


async def _watch_parent(ppid: int, stop: asyncio.Event) -> None:
    """Stop when the daemon that started us is gone (we were re-parented)."""
    while not stop.is_set():
        if os.getppid() != ppid:
            log.warning("packratd (pid %d) is gone; stopping", ppid)
            stop.set()
            return
        await asyncio.sleep(1.0)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m packratd.oip", description=__doc__.split("\n\n")[0])
    p.add_argument("--daemon", required=True, help="packratd's client endpoint (ipc://... ; server.listen)")
    p.add_argument("--http", default="", help="REST listen address ADDR:PORT (bare PORT: 127.0.0.1)")
    p.add_argument("--grpc", default="", help="gRPC listen address ADDR:PORT (bare PORT: 127.0.0.1)")
    p.add_argument("--model-name", default="model", help="the model's name for OIP clients")
    p.add_argument("--max-message-bytes", type=int, default=1 << 28, help="server.max_message_bytes of the daemon")
    p.add_argument("--max-inflight", type=int, default=64, help="requests held at once; more get 503 / UNAVAILABLE")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds to wait for packratd's answer")
    p.add_argument("--health-timeout", type=float, default=0.5, help="seconds a health check waits for packratd")
    p.add_argument("--tls-cert", default="", help="PEM certificate chain (with --tls-key: TLS on both listeners)")
    p.add_argument("--tls-key", default="", help="PEM private key")
    p.add_argument("--tls-client-ca", default="", help="PEM CA: clients must present a certificate it signed")
    p.add_argument("--parent-pid", type=int, default=0, help="stop when this process (the daemon) is gone")
    p.add_argument("--ports-file", default="", help="write the bound ports here as JSON once listening")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s packratd-oip[%(process)d] %(levelname)s %(message)s")
    problems = []
    if not args.http and not args.grpc:
        problems.append("give --http and/or --grpc")
    for flag in ("http", "grpc"):
        if getattr(args, flag):
            try:
                parse_listen(getattr(args, flag))
            except ValueError as e:
                problems.append(f"--{flag}: {e}")
    if bool(args.tls_cert) != bool(args.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key")
    if args.parent_pid and os.getppid() != args.parent_pid:
        problems.append(f"parent {args.parent_pid} is already gone")
    if problems:
        print("packratd-oip: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except StartupError as e:
        log.error("%s", e)
        return 3
    return 0
