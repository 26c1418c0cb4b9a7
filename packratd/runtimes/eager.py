"""eager: the torch.export program run by PyTorch itself (``torch.export.load(path).module()``).

Nothing to build; this is what every other runtime is checked against."""
from __future__ import annotations

NAME = "eager"
REQUIRES = (("torch", "torch", "2.5"),)
THREADS_IN_KEY = False
OPTIONS: dict = {}
NEEDS_BUILD = False


def versions() -> dict:
    return {}


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads = the instance's, one inter-op thread (as packratd.worker does)."""
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:     # already set, or parallel work already ran in this process
        pass


class Session:
    runtime = NAME

    def __init__(self, model_path: str, entry: str | None, manifest: dict | None, threads: int, cpus, pin: bool):
        from .. import model as model_mod
        set_torch_threads(threads)
        self._run = model_mod.run
        self.module, self.input_spec = model_mod.load(model_path)

    def run(self, arrays):
        return self._run(self.module, arrays)
