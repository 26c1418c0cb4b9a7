#!/usr/bin/env python3
"""Export a registry model (tools/models.py) to a torch.export ``.pt2`` file.

    python tools/export_model.py NAME OUT.pt2 [--seq-len N] [--max-batch N] [--verify]
    python tools/export_model.py --all DIR   [--seq-len N] [--max-batch N] [--verify]

Dim 0 of EVERY user input is exported as ONE shared symbolic batch dim with
range [1, max_batch]; every other dim is static (seq_len is baked in for
bert/gpt2).  Load with ``torch.export.load(path).module()``.

Why ``Dim("batch", min=1, max=N)`` and an example batch of 2 (torch 2.13):
  * example batch 1 + any dynamic spec -> 0/1 specialization: Dim(...) and
    Dim.DYNAMIC raise, Dim.AUTO silently exports a static batch of 1 (and
    logs a warning per input).
  * Dim.DYNAMIC with example batch 2 exports fine but records the range as
    [2, int_oo], i.e. it does not promise that batch 1 is valid.
  * Dim("batch", min=1, max=N) with example batch 2 records [1, N]; the
    loaded module accepts 1..N and raises a guard error above N.  Using the
    same Dim object for all inputs also states that they share the batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

try:  # imported as tools.export_model (repo root on sys.path)
    from tools import models as M
except ImportError:  # run as a script: tools/ is sys.path[0]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import models as M  # type: ignore[no-redef]

DEFAULT_MAX_BATCH = 1024
EXPORT_EXAMPLE_BATCH = 2  # must be >= 2, see module docstring

__all__ = ["export", "export_program", "save_atomic", "verify", "DEFAULT_MAX_BATCH"]


def _arg_names(model: torch.nn.Module, n: int) -> list[str]:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in params[:n]]


def export_program(name: str, seq_len: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                   model: torch.nn.Module | None = None):
    """Build registry model ``name`` (eval) and return ``(ExportedProgram, model)``."""
    if model is None:
        model = M.build(name, seq_len=seq_len)
    model.eval()
    args = M.example_inputs(name, EXPORT_EXAMPLE_BATCH, seq_len=seq_len)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic_shapes = {arg: {0: batch} for arg in _arg_names(model, len(args))}
    with torch.no_grad():
        ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    return ep, model


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def save_atomic(ep, path: str) -> None:
    """``torch.export.save`` to a temp file in the target dir, fsync, os.replace."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes it 0600
            torch.export.save(ep, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def verify(name: str, path: str, model: torch.nn.Module, seq_len: int | None = None,
           batches=(1, 3), atol: float = 1e-4) -> None:
    """Load ``path`` and check it matches ``model`` (eager) at the given batch sizes."""
    mod = torch.export.load(path).module()
    for b in batches:
        x = M.example_inputs(name, b, seq_len=seq_len, seed=100 + b)
        with torch.no_grad():
            want, got = model(*x), mod(*x)
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, (tuple, list)) else (got,)
        if len(want) != len(got):
            raise AssertionError(f"{name}: {len(got)} outputs, expected {len(want)}")
        for i, (w, g) in enumerate(zip(want, got)):
            if w.shape != g.shape or not torch.allclose(w, g, atol=atol, rtol=1e-4):
                err = (w - g).abs().max().item() if w.shape == g.shape else "shape"
                raise AssertionError(f"{name}: batch {b} output {i} mismatch (max abs err {err})")


def export(name: str, path: str, seq_len: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
           check: bool = False) -> dict:
    """Export registry model ``name`` to ``path`` (atomically).

    Returns a summary dict: name, params, path, bytes, seconds (build+export+save).
    With ``check=True`` the saved file is reloaded and compared with the eager
    model at batch 1 and 3 (not counted in ``seconds``).
    """
    if name not in M.MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(M.MODELS)}")
    t0 = time.perf_counter()
    ep, model = export_program(name, seq_len=seq_len, max_batch=max_batch)
    save_atomic(ep, path)
    seconds = time.perf_counter() - t0
    if check:
        verify(name, path, model, seq_len=seq_len)
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "path": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "seconds": seconds,
    }


def _summary_line(s: dict) -> str:
    return (f"{s['name']} params={s['params']:,} path={s['path']} "
            f"size={s['bytes'] / 2**20:.1f}MiB seconds={s['seconds']:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", choices=sorted(M.MODELS), help="registry model name")
    p.add_argument("out", nargs="?", help="output .pt2 path")
    p.add_argument("--all", metavar="DIR", help="export every registry model to DIR/NAME.pt2")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for bert/gpt2 (default 128)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="upper bound of the batch dim")
    p.add_argument("--verify", action="store_true", help="reload and compare with eager at batch 1 and 3")
    a = p.parse_args(argv)
    if a.all:
        if a.name or a.out:
            p.error("--all takes no NAME/OUT")
        jobs = [(n, os.path.join(a.all, n + ".pt2")) for n in M.MODELS]
    else:
        if not (a.name and a.out):
            p.error("need NAME OUT.pt2 (or --all DIR)")
        jobs = [(a.name, a.out)]
    for name, out in jobs:
        s = export(name, out, seq_len=a.seq_len, max_batch=a.max_batch, check=a.verify)
        print(_summary_line(s) + (" verified" if a.verify else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
