"""OIP REST (KServe v2 HTTP/JSON, with the binary tensor data extension) on tornado's HTTP/1.1 server.

tornado's low-level interface (an ``HTTPMessageDelegate`` per request, no ``tornado.web``): the
request line and headers arrive first, so sizes are checked before any of the body is read
(a declared Content-Length over the limit gets 413 at once), and the JSON inference header is checked
as soon as its bytes are in, before the binary data behind it.  Keep-alive is HTTP/1.1's default.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from urllib.parse import unquote

from tornado import httputil

from .. import protocol as P
from .service import Service, timeout_ms_from_us
from .tensors import (INTERNAL, NOT_FOUND, NUMPY_TO_OIP, TOO_BIG, Input, Kind, ModelSpec, OipError, array_from_values,
                      check_shape, invalid, nbytes, numpy_dtype, output_array)

log = logging.getLogger("packratd.oip")

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_BYTES = 32 << 20        # the JSON part of a request; bigger tensors go in binary
MAX_GET_BODY = 4096
SMALL_REPLY = 64 << 10

_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<verb>/ready|/infer)?/?$")


class Route:
    def __init__(self, kind: str, name: str = "", version: str = ""):
        self.kind, self.name, self.version = kind, name, version


def route(method: str, target: str) -> Route:
    path = target.split("?", 1)[0]
    if path in ("/v2/health/live", "/v2/health/ready"):
        r = Route("health_" + path.rsplit("/", 1)[1])
    elif path in ("/v2", "/v2/"):
        r = Route("server")
    else:
        m = _MODEL_PATH.match(path)
        if m is None:
            raise OipError(NOT_FOUND, f"no such endpoint: {path}")
        verb = {"/ready": "model_ready", "/infer": "infer"}.get(m.group("verb"), "metadata")
        r = Route(verb, unquote(m.group("name")), unquote(m.group("version") or ""))
    want = "POST" if r.kind == "infer" else "GET"
    if method != want:
        raise OipError(_BAD_METHOD, f"{path} takes {want}, not {method}")
    return r


_BAD_METHOD = Kind(405, "UNIMPLEMENTED")
_NO_LENGTH = Kind(411, "INVALID_ARGUMENT")
_BAD_ENCODING = Kind(415, "INVALID_ARGUMENT")


class RestApp(httputil.HTTPServerConnectionDelegate):
    """The request router handed to ``tornado.httpserver.HTTPServer``."""

    def __init__(self, service: Service):
        self.service = service

    def start_request(self, server_conn, request_conn) -> httputil.HTTPMessageDelegate:
        return _Exchange(self.service, request_conn)


class _Exchange(httputil.HTTPMessageDelegate):
    """One HTTP request and its answer."""

    def __init__(self, service: Service, conn):
        self.svc = service
        self.conn = conn
        self.route: Route | None = None
        self.answered = False
        self.closed = False
        self.admitted = False
        self.body: bytearray | None = None
        self.view: memoryview | None = None
        self.got = 0
        self.length = 0
        self.json_len = 0
        self.header: dict | None = None
        self.decl: list = []          # (input json, dtype, shape, binary size or None) per input

    # ---- tornado's callbacks -------------------------------------------------------------------
    def headers_received(self, start_line, headers):
        try:
            self.route = route(start_line.method, start_line.path)
            if self.route.kind == "infer":
                self.svc.check_model(self.route.name, self.route.version)
                self._expect_body(headers)
            else:
                self.conn.set_max_body_size(MAX_GET_BODY)
        except OipError as e:
            # Answered before the body is read: let tornado read (and drop) it until it closes the
            # connection after this answer, rather than add its own 400 for a body over its limit.
            self.conn.set_max_body_size(1 << 62)
            self._answer_error(e)

    def data_received(self, chunk):
        if self.answered or self.view is None:
            return
        n = len(chunk)
        self.view[self.got:self.got + n] = chunk
        self.got += n
        if self.header is None and self.got >= self.json_len:
            try:
                self._parse_header()            # refuse bad sizes before the binary data is read
            except OipError as e:
                self._answer_error(e)

    def finish(self):
        if self.answered:
            return
        asyncio.ensure_future(self._respond())

    def on_connection_close(self):
        self.closed = True
        self._release()

    # ---- request body --------------------------------------------------------------------------
    def _expect_body(self, headers) -> None:
        enc = headers.get("Content-Encoding", "identity").strip().lower()
        if enc not in ("", "identity"):
            raise OipError(_BAD_ENCODING, f"Content-Encoding {enc!r} is not supported; send the body uncompressed")
        if "Content-Length" not in headers:
            raise OipError(_NO_LENGTH, "an infer request needs a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(headers["Content-Length"])
            hlen = headers.get(HEADER_LENGTH)
            json_len = length if hlen is None else int(hlen)
        except ValueError:
            raise invalid(f"Content-Length and {HEADER_LENGTH} must be integers") from None
        if length <= 0:
            raise invalid("the request body is empty")
        if not 0 < json_len <= length:
            raise invalid(f"{HEADER_LENGTH} ({json_len}) must be between 1 and the Content-Length ({length})")
        if json_len > MAX_JSON_BYTES:
            raise OipError(TOO_BIG, f"the JSON part of the request is {json_len} bytes, more than {MAX_JSON_BYTES}; "
                                    "send tensors with the binary tensor data extension "
                                    f"({HEADER_LENGTH}, parameters.binary_data_size)")
        if length - json_len > self.svc.max_bytes:
            raise OipError(TOO_BIG, f"{P.TOO_LARGE}: the request carries {length - json_len} bytes of tensor data, "
                                    f"more than server.max_message_bytes ({self.svc.max_bytes}); split it", P.TOO_LARGE)
        self.conn.set_max_body_size(length)
        self.svc.admit()
        self.admitted = True
        self.length, self.json_len = length, json_len
        # calloc'd: pages are committed as the body arrives, not for the declared length.
        self.body = bytearray(length)
        self.view = memoryview(self.body)

    def _parse_header(self) -> None:
        try:
            head = json.loads(bytes(self.view[:self.json_len]))
        except (ValueError, RecursionError) as e:
            raise invalid(f"the inference request is not JSON: {str(e)[:200]}") from None
        if not isinstance(head, dict):
            raise invalid("the inference request must be a JSON object")
        inputs = head.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise invalid("the inference request needs a non-empty list \"inputs\"")
        if len(inputs) > P.MAX_TENSORS:
            raise invalid(f"at most {P.MAX_TENSORS} inputs")
        binary = 0
        self.decl = []
        for i, t in enumerate(inputs):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise invalid(f"inputs[{i}] must be an object with a string \"name\"")
            what = f"input {t['name']!r}"
            dtype = numpy_dtype(t.get("datatype"), what)
            shape = check_shape(t.get("shape"), what)
            params = _params(t, what)
            _no_shared_memory(params, what)
            size = params.get("binary_data_size")
            if size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise invalid(f"{what}: binary_data_size must be a non-negative integer")
                need = nbytes(dtype, shape)
                if size != need:
                    raise invalid(f"{what}: binary_data_size is {size} bytes but {t['datatype']}{list(shape)} "
                                  f"needs {need}")
                if "data" in t:
                    raise invalid(f"{what}: give either \"data\" or parameters.binary_data_size, not both")
                binary += size
            elif "data" not in t:
                raise invalid(f"{what}: no \"data\" and no parameters.binary_data_size")
            self.decl.append((t, dtype, shape, size))
        after = self.length - self.json_len
        if binary > after:
            raise invalid(f"truncated binary data: the inputs declare {binary} bytes after the {self.json_len}-byte "
                          f"JSON header, the body has {after}")
        if binary < after:
            raise invalid(f"the body has {after - binary} bytes after the binary data the inputs declare "
                          f"({binary}); check {HEADER_LENGTH} and binary_data_size")
        self.header = head

    # ---- answering -------------------------------------------------------------------------------
    async def _respond(self) -> None:
        try:
            r = self.route
            if r.kind == "infer":
                await self._infer()
                return
            if r.kind in ("health_live", "health_ready"):
                h = await self.svc.health()
                key = r.kind[7:]
                ok = h.live if key == "live" else h.ready
                # OIP: 200 means true, a 4xx means false (the body says why, for people with curl).
                if ok:
                    self._answer_json(200, {key: True})
                else:
                    self._answer_json(400, {key: False, "error": h.reason or f"packratd is {h.state or 'not ready'}"})
            elif r.kind == "server":
                self._answer_json(200, self.svc.server_metadata())
            elif r.kind == "metadata":
                self._answer_json(200, await self.svc.model_metadata(r.name, r.version))
            else:   # model_ready
                ready = await self.svc.model_ready(r.name, r.version)
                self._answer_json(200 if ready else 400, {"name": r.name, "ready": ready})
        except OipError as e:
            self._answer_error(e)
        except Exception as e:  # noqa: BLE001 - nothing a client sends may take the gateway down
            log.exception("unexpected error answering %s", self.route.kind if self.route else "?")
            self._answer_error(OipError(INTERNAL, f"INTERNAL: {type(e).__name__}: {e}", P.INTERNAL))
        finally:
            self._release()

    async def _infer(self) -> None:
        svc = self.svc
        if self.header is None:
            self._parse_header()
        head = self.header
        rid = head.get("id", "")
        if not isinstance(rid, str):
            raise invalid("\"id\" must be a string")
        params = _params(head, "the request")
        if params.get("sequence_id") not in (None, 0, ""):
            raise invalid("sequence batching (parameter sequence_id) is not supported")
        timeout_ms = timeout_ms_from_us(params.get("timeout"))
        spec = await svc.serving_spec()
        inputs, off = [], self.json_len
        for t, dtype, shape, size in self.decl:
            what = f"input {t['name']!r}"
            if size is not None:
                buf = self.view[off:off + size]
                off += size
            else:
                buf = array_from_values(t["data"], dtype, shape, what)
            inputs.append(Input(t["name"], dtype, shape, buf))
        want = _requested_outputs(head, params, spec)
        metas, bufs = await svc.infer(inputs, spec, timeout_ms)
        outs, chunks = [], []
        for idx, binary in want:
            meta, buf = metas[idx], bufs[idx]
            o = {"name": spec.outputs[idx].name, "datatype": NUMPY_TO_OIP[meta["dtype"]], "shape": meta["shape"]}
            if binary:
                o["parameters"] = {"binary_data_size": len(buf)}
                chunks.append(buf)
            else:
                o["data"] = output_array(meta, buf).ravel().tolist()
            outs.append(o)
        reply = {"model_name": svc.model_name, "model_version": "1", "outputs": outs}
        if rid:
            reply["id"] = rid
        js = json.dumps(reply, separators=(",", ":")).encode()
        if not chunks:
            self._answer(200, "application/json", [js])
        else:
            self._answer(200, "application/octet-stream", [js, *chunks], {HEADER_LENGTH: str(len(js))})

    def _answer_json(self, status: int, obj: dict) -> None:
        self._answer(status, "application/json", [json.dumps(obj, separators=(",", ":")).encode()])

    def _answer_error(self, e: OipError) -> None:
        self._answer_json(e.kind.http, {"error": e.message})

    def _answer(self, status: int, ctype: str, chunks: list, extra: dict | None = None) -> None:
        if self.answered:
            return
        self.answered = True
        if self.closed:
            return
        headers = httputil.HTTPHeaders({"Content-Type": ctype, "Content-Length": str(sum(len(c) for c in chunks))})
        for k, v in (extra or {}).items():
            headers[k] = v
        reason = httputil.responses.get(status, "Unknown")
        if len(chunks) > 1 and sum(len(c) for c in chunks) < SMALL_REPLY:
            chunks = [b"".join(chunks)]          # one write, one syscall
        self.conn.write_headers(httputil.ResponseStartLine("HTTP/1.1", status, reason), headers, chunks[0])
        for c in chunks[1:]:
            self.conn.write(c)
        self.conn.finish()
        self._release()

    def _release(self) -> None:
        if self.admitted:
            self.admitted = False
            self.svc.release()
        if self.answered:
            self.view = None


def _params(obj: dict, what: str) -> dict:
    p = obj.get("parameters", {})
    if not isinstance(p, dict):
        raise invalid(f"{what}: \"parameters\" must be an object")
    return p


def _no_shared_memory(params: dict, what: str) -> None:
    if any(k.startswith("shared_memory") for k in params):
        raise invalid(f"{what}: shared-memory tensors are not supported; send the data in the request")


def _requested_outputs(head: dict, params: dict, spec: ModelSpec) -> list[tuple[int, bool]]:
    """[(output index, in binary?)]: the outputs asked for (all when none are named)."""
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise invalid("parameter binary_data_output must be true or false")
    asked = head.get("outputs")
    if asked is None:
        return [(i, default) for i in range(len(spec.outputs))]
    if not isinstance(asked, list):
        raise invalid("\"outputs\" must be a list")
    out = []
    for j, o in enumerate(asked):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise invalid(f"outputs[{j}] must be an object with a string \"name\"")
        what = f"output {o['name']!r}"
        p = _params(o, what)
        _no_shared_memory(p, what)
        if p.get("classification"):
            raise invalid(f"{what}: classification outputs are not supported")
        binary = p.get("binary_data", default)
        if not isinstance(binary, bool):
            raise invalid(f"{what}: binary_data must be true or false")
        out.append((spec.output_index(o["name"]), binary))
    return out
