"""OIP gRPC: ``inference.GRPCInferenceService`` on a grpc.aio server sharing the gateway's asyncio loop.

Registered through a generic handler with the message classes of :mod:`.proto`; methods that are not
registered (the repository and streaming calls, Triton's extras) get UNIMPLEMENTED from grpc itself.
Outputs always come back in ``raw_output_contents``; inputs may be raw or typed (``contents``).
"""
from __future__ import annotations

import logging

import grpc

from .. import protocol as P
from . import proto
from .service import Service, timeout_ms_from_us
from .tensors import (INTERNAL, MODEL_VERSION, NUMPY_TO_OIP, Input, OipError, array_from_values, check_shape, invalid,
                      nbytes, numpy_dtype)

log = logging.getLogger("packratd.oip")

# OIP datatype -> the InferTensorContents field that carries it in the typed (non-raw) form.
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _param(params, key):
    """The value of a map<string, InferParameter> entry, or None."""
    if key not in params:
        return None
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class GrpcApi:
    def __init__(self, service: Service):
        self.svc = service

    def handler(self) -> grpc.GenericRpcHandler:
        impl = {"ServerLive": self.server_live, "ServerReady": self.server_ready, "ModelReady": self.model_ready,
                "ServerMetadata": self.server_metadata, "ModelMetadata": self.model_metadata,
                "ModelInfer": self.model_infer}
        methods = {name: grpc.unary_unary_rpc_method_handler(
                       impl[name], request_deserializer=req.FromString, response_serializer=resp.SerializeToString)
                   for name, (req, resp) in proto.METHODS.items()}
        return grpc.method_handlers_generic_handler(proto.SERVICE, methods)

    async def _abort(self, context, e: OipError):
        await context.abort(getattr(grpc.StatusCode, e.kind.grpc), e.message)

    async def server_live(self, request, context):
        return proto.ServerLiveResponse(live=(await self.svc.health()).live)

    async def server_ready(self, request, context):
        return proto.ServerReadyResponse(ready=(await self.svc.health()).ready)

    async def server_metadata(self, request, context):
        return proto.ServerMetadataResponse(**self.svc.server_metadata())

    async def model_ready(self, request, context):
        try:
            return proto.ModelReadyResponse(ready=await self.svc.model_ready(request.name, request.version))
        except OipError as e:
            await self._abort(context, e)

    async def model_metadata(self, request, context):
        try:
            md = await self.svc.model_metadata(request.name, request.version)
        except OipError as e:
            await self._abort(context, e)
        r = proto.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for key in ("inputs", "outputs"):
            for t in md[key]:
                getattr(r, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return r

    async def model_infer(self, request, context):
        try:
            self.svc.admit()
        except OipError as e:
            await self._abort(context, e)
        try:
            return await self._infer(request, context)
        except OipError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - nothing a client sends may take the gateway down
            log.exception("unexpected error in ModelInfer")
            err = OipError(INTERNAL, f"INTERNAL: {type(e).__name__}: {e}", P.INTERNAL)
        finally:
            self.svc.release()
        await self._abort(context, err)

    async def _infer(self, request, context):
        svc = self.svc
        svc.check_model(request.model_name, request.model_version)
        if _param(request.parameters, "sequence_id") not in (None, 0, ""):
            raise invalid("sequence batching (parameter sequence_id) is not supported")
        timeout_ms = timeout_ms_from_us(_param(request.parameters, "timeout"))
        remaining = context.time_remaining()          # the client's deadline, if it set one
        if remaining is not None:
            timeout_ms = min(timeout_ms or float("inf"), max(remaining, 0.001) * 1000.0)
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
        if len(request.inputs) > P.MAX_TENSORS:
            raise invalid(f"at most {P.MAX_TENSORS} inputs")
        inputs = []
        for i, t in enumerate(request.inputs):
            what = f"input {t.name!r}"
            dtype = numpy_dtype(t.datatype, what)
            shape = check_shape(list(t.shape), what)
            if any(k.startswith("shared_memory") for k in t.parameters):
                raise invalid(f"{what}: shared-memory tensors are not supported; send the data in the request")
            if raw:
                if t.HasField("contents"):
                    raise invalid(f"{what}: contents given together with raw_input_contents")
                buf, need = raw[i], nbytes(dtype, shape)
                if len(buf) != need:
                    raise invalid(f"{what}: raw_input_contents[{i}] has {len(buf)} bytes, "
                                  f"{t.datatype}{list(shape)} needs {need}")
            else:
                field = CONTENTS_FIELD.get(t.datatype)
                if field is None:
                    raise invalid(f"{what}: {t.datatype} has no typed contents field; send it in raw_input_contents")
                buf = array_from_values(getattr(t.contents, field), dtype, shape, what)
            inputs.append(Input(t.name, dtype, shape, buf))
        spec = await svc.serving_spec()
        want = []
        for o in request.outputs:
            if any(k.startswith("shared_memory") for k in o.parameters):
                raise invalid(f"output {o.name!r}: shared-memory tensors are not supported")
            if _param(o.parameters, "classification"):
                raise invalid(f"output {o.name!r}: classification outputs are not supported")
            want.append(spec.output_index(o.name))
        if not request.outputs:
            want = list(range(len(spec.outputs)))
        metas, bufs = await svc.infer(inputs, spec, timeout_ms, wait_s=remaining)
        r = proto.ModelInferResponse(model_name=svc.model_name, model_version=MODEL_VERSION, id=request.id)
        for idx in want:
            meta = metas[idx]
            r.outputs.add(name=spec.outputs[idx].name, datatype=NUMPY_TO_OIP[meta["dtype"]], shape=meta["shape"])
            r.raw_output_contents.append(bytes(bufs[idx]))
        return r
