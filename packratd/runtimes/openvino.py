"""openvino: Intel's OpenVINO runtime, converted from the same torch.export program.

Build: ``openvino.convert_model(exported_program)``, inputs reshaped to the program's static
tails with a dynamic batch (``[-1, 3, 224, 224]``), saved as IR (xml + bin) with fp32 weights
(``compress_to_fp16=False``: the default would halve the weights' precision).

Run: one compiled model, one infer request, properties
  INFERENCE_NUM_THREADS = the instance's threads, NUM_STREAMS = 1 (one inference at a time, like a
  packratd worker), ENABLE_CPU_PINNING = pin (OpenVINO pins its own threads; the process affinity
  is already the instance's CPUs, and OpenVINO keeps inside it), PERFORMANCE_HINT = LATENCY,
  INFERENCE_PRECISION_HINT = f32 (on AMX / AVX512_BF16 CPUs OpenVINO's default is bf16, 1e-2
  relative error, which packratd's numerics check rejects).
The IR does not depend on the thread count; compile_model runs in the worker at load.
"""
from __future__ import annotations

import os

NAME = "openvino"
REQUIRES = (("openvino", "openvino", "2025.0"),)
THREADS_IN_KEY = False
OPTIONS = {"ir_fp16_weights": False, "static_tails": True}
NEEDS_BUILD = True
FILE = "model.xml"


def extra_reason() -> str | None:
    return None


def versions() -> dict:
    import importlib.metadata as md
    return {"openvino": md.version("openvino")}


def build(ep, out_dir: str, spec: list[dict], options: dict) -> dict:
    import openvino as ov
    model = ov.convert_model(ep)
    if len(model.inputs) != len(spec):
        raise ValueError(f"OpenVINO model has {len(model.inputs)} inputs, the program has {len(spec)}")
    model.reshape({model.inputs[i]: ov.PartialShape([-1] + s["shape"][1:]) for i, s in enumerate(spec)})
    ov.save_model(model, os.path.join(out_dir, FILE), compress_to_fp16=False)
    return {}


def properties(threads: int, pin: bool) -> dict:
    return {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": bool(pin),
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


class Session:
    runtime = NAME

    def __init__(self, model_path: str, entry: str, manifest: dict, threads: int, cpus, pin: bool):
        import numpy as np
        import openvino as ov
        self._np = np
        self.input_spec = manifest["input_spec"]
        self.core = ov.Core()
        self.compiled = self.core.compile_model(os.path.join(entry, FILE), "CPU", properties(threads, pin))
        self.request = self.compiled.create_infer_request()
        self._outputs = list(self.compiled.outputs)
        from . import match_inputs
        ins = list(self.compiled.inputs)
        pairs = match_inputs([sorted(i.get_names()) for i in ins], self.input_spec, "OpenVINO model")
        self._feed = [(ins[j], k) for j, (_, k) in enumerate(pairs)]

    def settings(self) -> dict:
        """The properties as the compiled model reports them (for status and tests)."""
        keys = ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "ENABLE_CPU_PINNING", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT")
        out = {}
        for k in keys:
            v = self.compiled.get_property(k)
            out[k] = v.to_string() if hasattr(v, "to_string") else getattr(v, "name", None) or str(v)
        return out

    def run(self, arrays):
        np = self._np
        feed = {port: np.ascontiguousarray(arrays[k]) for port, k in self._feed}
        res = self.request.infer(feed, share_inputs=True, share_outputs=False)
        return [np.ascontiguousarray(res[o]) for o in self._outputs]
