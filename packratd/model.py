"""Loading a torch.export archive and describing its inputs and outputs.

torch is imported inside the functions that need it, so the daemon (which never runs the
model itself) can use :func:`example_inputs` without loading torch.
"""
from __future__ import annotations

import numpy as np


def _np_dtype_name(dtype) -> str:
    import torch
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype.name
    except TypeError:
        raise ValueError(f"model uses dtype {dtype}, which has no numpy equivalent on the wire") from None


def input_spec(ep) -> list[dict]:
    """Describe the user inputs of an ExportedProgram: name, numpy dtype name, shape with None for dim 0."""
    import torch
    user_inputs = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    spec = []
    for name in user_inputs:
        node = nodes.get(name)
        val = node.meta.get("val") if node is not None else None
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"model input {name!r} is not a tensor; packratd serves tensor inputs only")
        if val.dim() < 1:
            raise ValueError(f"model input {name!r} is a scalar; inputs need a batch dimension 0")
        tail = []
        for d in val.shape[1:]:
            if not isinstance(d, int):
                raise ValueError(f"model input {name!r} has a dynamic dimension other than 0 ({list(val.shape)}); "
                                 "only the batch dimension may be dynamic")
            tail.append(int(d))
        if isinstance(val.shape[0], int):
            raise ValueError(f"model input {name!r} has a static batch dimension {val.shape[0]}; "
                             "export it with a dynamic dim 0 (tools/export_model.py does)")
        spec.append({"name": name, "dtype": _np_dtype_name(val.dtype), "shape": [None] + tail})
    if not spec:
        raise ValueError("model has no tensor inputs")
    return spec


def load(path: str):
    """Returns (callable module, input spec)."""
    import torch
    ep = torch.export.load(path)
    return ep.module(), input_spec(ep)


def example_inputs(spec: list[dict], batch: int, seed: int = 0) -> list[np.ndarray]:
    """Inputs of the right dtype and shape for warm-up and profiling.

    Floats are standard normal; integers and booleans are all ones (a valid token id for any
    vocabulary of two or more, and "keep" for an attention mask, so no row is fully masked)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in spec:
        shape = (batch, *s["shape"][1:])
        dt = np.dtype(s["dtype"])
        if dt.kind == "f":
            out.append(rng.standard_normal(shape).astype(dt))
        else:
            out.append(np.ones(shape, dtype=dt))
    return out


def run(module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Run the module on numpy inputs under inference mode; outputs as C-contiguous numpy arrays."""
    import torch
    from torch.utils._pytree import tree_leaves
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    arrays = []
    for i, t in enumerate(tree_leaves(out)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"model output {i} is a {type(t).__name__}, not a tensor")
        if t.dim() == 0:
            raise ValueError(f"model output {i} is a scalar (0-d); packratd needs every output batched on dim 0")
        try:
            arrays.append(np.ascontiguousarray(t.detach().numpy()))
        except TypeError:
            raise ValueError(f"model output {i} has dtype {t.dtype}, which has no numpy equivalent and cannot be "
                             "sent to clients; cast it (e.g. to float32) in the model before exporting") from None
    return arrays


def output_spec(outputs: list[np.ndarray]) -> list[dict]:
    return [{"dtype": o.dtype.name, "shape": [None] + list(o.shape[1:])} for o in outputs]
