"""Files packratd keeps on disk: atomic writes, content digests, and content-addressed model copies.

Everything under ``server.state_dir`` is written with :func:`write_atomic` (temp file in the same
directory, fsync, rename, fsync of the directory), so a crash never leaves a half-written profile,
artifact or model copy behind under its final name.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

_digests: dict = {}


def write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _fsync_dir(d: str) -> None:
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def file_digest(path: str) -> str:
    """SHA-256 of a file's contents (hex), memoised by (path, size, mtime)."""
    st = os.stat(path)
    k = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if k not in _digests:
        _digests[k] = sha256_file(path)
    return _digests[k]


def snapshot_model(path: str, state_dir: str) -> tuple[str, str]:
    """Copy the model file into ``<state_dir>/models/<sha256>.pt2`` and return (copy path, digest).

    The digest is computed over exactly the bytes written, so a file rewritten while it is copied
    still gives a copy that matches its name.  Workers load the copy: a model file rewritten in place
    later cannot reach a generation started before (reload notices the new digest and rolls out a
    new generation).  An existing copy whose digest checks out is reused."""
    d = os.path.join(state_dir, "models")
    os.makedirs(d, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt2", dir=d)
    try:
        h = hashlib.sha256()
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        digest = h.hexdigest()
        final = os.path.join(d, f"{digest}.pt2")
        if os.path.exists(final) and sha256_file(final) == digest:
            _unlink_quietly(tmp)
        else:
            os.chmod(tmp, 0o640)
            os.replace(tmp, final)
            _fsync_dir(d)
        return final, digest
    except BaseException:
        _unlink_quietly(tmp)
        raise


def sha256_file(path: str) -> str:
    """SHA-256 of a file's contents (hex), read now."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prune_models(state_dir: str, keep: set[str]) -> None:
    """Remove model copies whose digest is not in ``keep`` (generations no longer running)."""
    d = os.path.join(state_dir, "models")
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        if n.endswith(".pt2") and n[:-4] not in keep:
            _unlink_quietly(os.path.join(d, n))
