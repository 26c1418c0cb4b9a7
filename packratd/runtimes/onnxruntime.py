"""onnxruntime: ONNX Runtime's CPU execution provider, on an ONNX graph exported from the same
torch.export program with ``torch.onnx.export(program, dynamo=True)`` (the batch dimension stays
symbolic).

Run: intra_op_num_threads = the instance's threads, inter_op_num_threads = 1, sequential
execution, ``session.intra_op.allow_spinning = 0``.  Why spinning off: with spinning on, ORT's pool
threads spin after every call (measured, ResNet-50 B=1, 2 threads: 28 ms of CPU burnt in each
50 ms gap between calls, i.e. more than half a core, taken from whoever runs next on those cores)
and B=1 latency did not improve (23.1 ms on vs 23.0 ms off).  With pinning, ORT's pool threads
(threads - 1 of them; the calling thread is the worker's own) are pinned one per CPU to the
instance's CPUs after the first (``session.intra_op_thread_affinities``, 1-based ids); the caller
keeps the process mask, which is already the instance's CPUs.
The graph does not depend on the thread count; ORT optimises it when the session is created.
"""
from __future__ import annotations

import os

NAME = "onnxruntime"
REQUIRES = (("onnxruntime", "onnxruntime", "1.20"), ("onnx", "onnx", "1.17"), ("onnxscript", "onnxscript", "0.5"))
THREADS_IN_KEY = False
OPTIONS = {"exporter": "dynamo", "optimize": True, "external_data": True}
NEEDS_BUILD = True
FILE = "model.onnx"
# "0": see the module docstring.  PACKRATD_ORT_ALLOW_SPINNING=1 turns it on, for measuring only
# (tools/bench_runtimes.py --spin-check).
ALLOW_SPINNING = "1" if os.environ.get("PACKRATD_ORT_ALLOW_SPINNING") == "1" else "0"


def extra_reason() -> str | None:
    return None


def versions() -> dict:
    import importlib.metadata as md
    return {d: md.version(d) for d in ("onnxruntime", "onnx", "onnxscript")}


def build(ep, out_dir: str, spec: list[dict], options: dict) -> dict:
    import torch
    prog = torch.onnx.export(ep, dynamo=True, optimize=options["optimize"], verbose=False)
    # external data: the graph in model.onnx, the weights beside it (protobuf's 2 GiB limit)
    prog.save(os.path.join(out_dir, FILE), external_data=options["external_data"])
    return {}


def session_options(threads: int, cpus, pin: bool):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", ALLOW_SPINNING)
    cpus = list(cpus or [])
    if pin and threads > 1 and len(cpus) >= threads:
        so.add_session_config_entry("session.intra_op_thread_affinities",
                                    ";".join(str(c + 1) for c in cpus[1:threads]))
    return so


class Session:
    runtime = NAME

    def __init__(self, model_path: str, entry: str, manifest: dict, threads: int, cpus, pin: bool):
        import numpy as np
        import onnxruntime as ort
        self._np = np
        self.input_spec = manifest["input_spec"]
        self.session = ort.InferenceSession(os.path.join(entry, FILE), session_options(threads, cpus, pin),
                                            providers=["CPUExecutionProvider"])
        from . import match_inputs
        self._feed = match_inputs([[i.name] for i in self.session.get_inputs()], self.input_spec, "ONNX graph")

    def run(self, arrays):
        np = self._np
        outs = self.session.run(None, {n: np.ascontiguousarray(arrays[k]) for n, k in self._feed})
        return [np.ascontiguousarray(o) for o in outs]
