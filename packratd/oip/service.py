"""What both front ends (REST and gRPC) do: health, metadata and inference through the daemon link."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import __version__
from .. import protocol as P
from .link import DaemonLink, NoAnswer, NotConnected
from .tensors import (DEADLINE, INTERNAL, MODEL_VERSION, NOT_FOUND, UNAVAILABLE, Input, ModelSpec, OipError, invalid,
                      model_metadata, order_inputs)

log = logging.getLogger("packratd.oip")

SERVER_NAME = "packratd"
EXTENSIONS = ["binary_tensor_data"]
SPEC_TTL_S = 5.0


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    state: str            # the daemon's state, or "unreachable"
    reason: str = ""


class Service:
    def __init__(self, link: DaemonLink, model_name: str, max_bytes: int, request_timeout_s: float = 60.0,
                 health_timeout_s: float = 0.5, max_inflight: int = 64):
        self.link = link
        self.model_name = model_name
        self.max_bytes = max_bytes
        self.request_timeout_s = request_timeout_s
        self.health_timeout_s = health_timeout_s
        self.max_inflight = max_inflight
        self.inflight = 0                     # requests admitted (REST bodies being read count too)
        self._spec: ModelSpec | None = None
        self._spec_at = 0.0

    # ---- admission -------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count one request in; beyond max_inflight the gateway sheds load (503 / UNAVAILABLE)."""
        if self.inflight >= self.max_inflight:
            raise OipError(UNAVAILABLE, f"OVERLOADED: the gateway already holds {self.inflight} requests "
                                        "(oip.max_inflight); retry later", P.OVERLOADED)
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    # ---- health and metadata ---------------------------------------------------------------------
    async def health(self) -> Health:
        """live: packratd's main loop answers; ready: a generation is serving."""
        try:
            head, _ = await self.link.call({"op": "health"}, timeout=self.health_timeout_s)
        except (NotConnected, NoAnswer) as e:
            return Health(False, False, "unreachable", str(e))
        if head.get("status") == "ok":
            return Health(bool(head.get("live", True)), bool(head.get("ready")), str(head.get("state", "")))
        if head.get("code") != P.UNKNOWN_OP:
            return Health(True, False, "", f"{head.get('code')}: {head.get('message')}")
        # A daemon without the health op: it answered, so its loop turns; ready once it has a model.
        try:
            spec = await self.spec(fresh=True, timeout=self.health_timeout_s)
        except OipError as e:
            return Health(True, False, "", e.message)
        return Health(True, True, "serving") if spec is not None else Health(True, False, "starting")

    async def spec(self, fresh: bool = False, timeout: float | None = None) -> ModelSpec | None:
        now = time.monotonic()
        if not fresh and self._spec is not None and now - self._spec_at < SPEC_TTL_S:
            return self._spec
        head, _ = await self._call({"op": "spec"}, timeout=timeout or self.request_timeout_s)
        spec = ModelSpec.from_reply(head)
        if spec is not None:
            self._spec, self._spec_at = spec, now
        return spec

    async def serving_spec(self) -> ModelSpec:
        spec = await self.spec()
        if spec is None:
            raise OipError(UNAVAILABLE, "UNAVAILABLE: packratd has not loaded the model yet (starting or profiling)",
                           "UNAVAILABLE")
        return spec

    def check_model(self, name: str, version: str = "") -> None:
        if name != self.model_name:
            raise OipError(NOT_FOUND, f"unknown model {name!r}: this server serves {self.model_name!r}")
        if version not in ("", MODEL_VERSION):
            raise OipError(NOT_FOUND, f"model {name!r} has no version {version!r} (only {MODEL_VERSION!r})")

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    async def model_metadata(self, name: str, version: str = "") -> dict:
        self.check_model(name, version)
        return model_metadata(self.model_name, await self.serving_spec())

    async def model_ready(self, name: str, version: str = "") -> bool:
        self.check_model(name, version)
        return (await self.health()).ready

    # ---- inference -------------------------------------------------------------------------------
    async def infer(self, inputs: list[Input], spec: ModelSpec, timeout_ms: float | None = None,
                    wait_s: float | None = None) -> tuple[list[dict], list]:
        """Run one request: (output metas [{"dtype","shape"}], output buffers).  Raises OipError."""
        ordered = order_inputs(inputs, spec, self.max_bytes)
        head = {"op": "infer", "tensors": [t.meta() for t in ordered]}
        if timeout_ms is not None:
            head["timeout_ms"] = timeout_ms
        wait = self.request_timeout_s if wait_s is None else max(0.001, min(wait_s, self.request_timeout_s))
        try:
            reply, frames = await self._call(head, [t.buffer for t in ordered], timeout=wait)
        except OipError as e:
            if e.kind is UNAVAILABLE and wait < self.request_timeout_s and e.code == "NO_ANSWER":
                raise OipError(DEADLINE, "TIMEOUT: no answer from packratd within the request's deadline",
                               P.TIMEOUT) from None
            raise
        metas = reply.get("tensors") or []
        if len(metas) != len(frames):
            raise OipError(INTERNAL, "INTERNAL: packratd's reply does not match its header", P.INTERNAL)
        return metas, [f.buffer for f in frames]

    async def _call(self, head: dict, buffers=(), timeout: float = 60.0) -> tuple[dict, list]:
        try:
            reply, frames = await self.link.call(head, buffers, timeout=timeout)
        except NotConnected as e:
            raise OipError(UNAVAILABLE, f"UNAVAILABLE: {e}", "UNAVAILABLE") from None
        except NoAnswer as e:
            raise OipError(UNAVAILABLE, f"UNAVAILABLE: {e}", "NO_ANSWER") from None
        if reply.get("status") != "ok":
            code = str(reply.get("code", P.INTERNAL))
            if code == P.MODEL_MISMATCH:
                self._spec = None                 # the model may have changed under us: ask again next time
            raise OipError.from_daemon(code, str(reply.get("message", "")))
        return reply, frames


def timeout_ms_from_us(value, what: str = "parameter timeout") -> float | None:
    """Triton's ``timeout`` request parameter (microseconds; 0 = none) -> packratd timeout_ms."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise invalid(f"{what} must be a non-negative number of microseconds")
    return float(value) / 1000.0 if value > 0 else None
