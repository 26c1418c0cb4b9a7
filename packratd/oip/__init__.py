"""Open Inference Protocol (KServe v2) gateway for packratd: REST and gRPC in, packratd's ZeroMQ protocol out.

The gateway runs as its own process (``python -m packratd.oip``, see gateway.py), which the daemon
starts and supervises when ``oip.http_listen`` or ``oip.grpc_listen`` is set.  This module is imported
by the daemon and by config.py: standard library only, nothing of the gateway itself.
"""
from __future__ import annotations

import ipaddress
import os
import sys

LOCAL_SOCKET = "oip-gateway.sock"
PORTS_FILE = "oip-ports.json"          # the gateway writes the ports it bound here (useful with port 0)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[IPv6]:PORT`` or a bare ``PORT`` (= 127.0.0.1:PORT) -> (host, port).  Raises ValueError."""
    t = text.strip()
    if t.isdigit():
        host, port = "127.0.0.1", t
    elif t.startswith("["):
        host, sep, port = t[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: an IPv6 address needs the form [ADDR]:PORT")
    else:
        host, sep, port = t.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"{text!r}: give ADDR:PORT (e.g. 127.0.0.1:8000, 0.0.0.0:8000, [::1]:8000) or a bare PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number in 0..65535")
    return host, int(port)


def listen_problem(text: str) -> str | None:
    """Config check for oip.http_listen / oip.grpc_listen: None when fine (empty = off)."""
    if not text:
        return None
    try:
        parse_listen(text)
    except ValueError as e:
        return str(e)
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_endpoint(cfg) -> str:
    """The ipc endpoint the gateway uses to reach the dispatcher.

    ``server.listen`` itself when it is ipc://; with a tcp:// (CURVE) server.listen the daemon must also
    bind this owner-only ipc socket in the runtime directory (the gateway runs as the daemon's user)."""
    if cfg.listen.startswith("ipc://"):
        return cfg.listen
    return "ipc://" + os.path.join(cfg["server.runtime_dir"], LOCAL_SOCKET)


def model_name(cfg) -> str:
    """oip.model_name, or the model file's name without .pt2."""
    name = cfg["oip.model_name"]
    if name:
        return name
    base = os.path.basename(cfg["model.path"])
    return base[:-4] if base.endswith(".pt2") else base


def gateway_argv(cfg, parent_pid: int | None = None) -> list[str] | None:
    """The command line of the gateway process for this config; None when both OIP listeners are off.

    Raises ValueError when the TLS options do not fit together (a certificate without its key or the
    other way round, a client CA without a certificate)."""
    http, grpc = cfg["oip.http_listen"], cfg["oip.grpc_listen"]
    if not http and not grpc:
        return None
    cert, key, ca = cfg["oip.tls_cert"], cfg["oip.tls_key"], cfg["oip.tls_client_ca"]
    if bool(cert) != bool(key):
        raise ValueError("oip.tls_cert and oip.tls_key go together: give both (TLS) or neither (plain)")
    if ca and not cert:
        raise ValueError("oip.tls_client_ca needs oip.tls_cert and oip.tls_key (mutual TLS is TLS first)")
    argv = [sys.executable, "-m", "packratd.oip", "--daemon", local_endpoint(cfg), "--model-name", model_name(cfg),
            "--max-message-bytes", str(cfg["server.max_message_bytes"]),
            "--max-inflight", str(cfg["oip.max_inflight"]),
            "--request-timeout", str(cfg["oip.request_timeout_s"]),
            "--log-level", cfg["log.level"],
            "--parent-pid", str(os.getpid() if parent_pid is None else parent_pid),
            "--ports-file", os.path.join(cfg["server.runtime_dir"], PORTS_FILE)]
    if http:
        argv += ["--http", http]
    if grpc:
        argv += ["--grpc", grpc]
    if cert:
        argv += ["--tls-cert", cert, "--tls-key", key]
    if ca:
        argv += ["--tls-client-ca", ca]
    return argv
