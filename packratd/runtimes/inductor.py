"""inductor: torch's own compiler, ahead of time (AOTInductor), from the same torch.export program.

Built with ``torch._inductor.aoti_compile_and_package`` into one ``.pt2`` package (a shared
library with the weights inside) that keeps the program's dynamic batch range; a worker loads it
with ``torch._inductor.aoti_load_package`` in a fraction of a second and never compiles.
Why AOTInductor and not ``torch.compile`` (ResNet-50, 2 threads, Xeon with AVX-512/AMX, other
jobs on the machine; ``tools/bench_runtimes.py --quick --compare-inductor``): both compile once
(AOTI 21 s; torch.compile 15 s for the first batch-1 answer plus 8.7 s more for batch 8), but a
new torch.compile process still spends 6.5 s before its first batch-1 answer and 7.1 s before its
first batch-8 answer even with a warm inductor cache (dynamo traces again; batch 1 is specialised
apart from the rest), so every worker boot and every new batch-size class would compile on the
serving path; an AOTI worker is ready in 2.7 s (eager's is 2.4 s: most of it is importing torch).
Served latency: B=8 equal (188.9 vs 188.6 ms), B=1 torch.compile 11% faster (29.5 vs 33.3 ms).

Options: ``freezing`` (weights become constants: oneDNN pre-packs them and folds BatchNorm; it only
takes effect with grad off, hence the ``no_grad`` below), and
``cpp.dynamic_threads`` (kernels take omp_get_max_threads() at run time instead of baking the
compile-time thread count into ``#pragma omp parallel num_threads(N)``).  With the latter the
artifact is independent of the instance's thread count (measured, unfrozen build: ResNet-50, 2
threads, B=1/8 39.4/206.3 ms baked vs 39.7/206.6 ms dynamic), so one compile serves every instance shape.
"""
from __future__ import annotations

import os
import shutil
import tempfile

NAME = "inductor"
REQUIRES = (("torch", "torch", "2.6"),)
THREADS_IN_KEY = False
OPTIONS = {"flavour": "aoti", "freezing": True, "cpp.dynamic_threads": True, "grad": False}
# Tried in this order by prepare(specials="strict"): freezing fuses ReLU into oneDNN's convolution /
# linear post-ops, which compute Relu(NaN) = 0 (a NaN input row of a ReLU network comes out finite,
# unlike eager); without freezing inductor keeps eager's NaN semantics, at a cost (ResNet-50, 2
# threads: B=1 44 vs 33 ms, B=8 226 vs 189 ms).
VARIANTS = (OPTIONS, dict(OPTIONS, freezing=False))
NEEDS_BUILD = True
FILE = "model.aoti.pt2"


def extra_reason() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"inductor needs a C++ compiler to build the model and {cxx!r} is not on PATH (apt-get install g++)"
    return None


def versions() -> dict:
    return {}


def build(ep, out_dir: str, spec: list[dict], options: dict) -> dict:
    import torch
    import torch._inductor
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    # A private inductor cache for this build only: the shared one under /tmp would keep a copy
    # of every compiled model (with its weights) forever.
    scratch = tempfile.mkdtemp(prefix=f".tmp-inductor-{os.getpid()}-", dir=os.path.dirname(out_dir))
    try:
        # no_grad: inductor applies freezing only when grad is off (compile_fx: "config.freezing and
        # not torch.is_grad_enabled()"); with grad on, convolutions stay plain aten calls with
        # weights reordered every call (ResNet-50 B=8 on 2 threads: 226 ms instead of 192 ms).
        with temporary_cache_dir(scratch), torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                ep, package_path=os.path.join(out_dir, FILE),
                inductor_configs={"freezing": options["freezing"], "cpp.dynamic_threads": options["cpp.dynamic_threads"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {}


class Session:
    runtime = NAME

    def __init__(self, model_path: str, entry: str, manifest: dict, threads: int, cpus, pin: bool):
        import torch
        import torch._inductor
        from torch.utils._pytree import tree_leaves
        from .eager import set_torch_threads
        set_torch_threads(threads)
        self.input_spec = manifest["input_spec"]
        self._torch, self._leaves = torch, tree_leaves
        # The loader unpacks the package into a fresh dir under $TMPDIR and deletes it only at exit;
        # a killed worker would leave hundreds of MB behind.  Unpack into a dir of ours and delete it
        # as soon as the library is mapped (nothing is read from it afterwards).
        unpack = tempfile.mkdtemp(prefix=f".tmp-unpack-{os.getpid()}-", dir=os.path.dirname(entry))
        old = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = unpack
        try:
            self.module = torch._inductor.aoti_load_package(os.path.join(entry, FILE))
        finally:
            if old is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old
            shutil.rmtree(unpack, ignore_errors=True)

    def run(self, arrays):
        import numpy as np
        torch = self._torch
        with torch.inference_mode():
            out = self.module(*[torch.from_numpy(a) for a in arrays])
        return [np.ascontiguousarray(t.detach().numpy()) for t in self._leaves(out)]
