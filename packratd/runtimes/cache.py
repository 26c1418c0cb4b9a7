"""The on-disk cache of compiled / converted models: keys, atomic entries, validation.

One entry is one directory ``<cache_dir>/<runtime>-<key>/`` holding the runtime's files and a
``manifest.json`` written last.  An entry is built in a private temp directory
(``.tmp-<runtime>-<key>-<pid>-XXXX``), every file is fsync'd, the manifest records each file's
size and sha256, and only then is the directory renamed into place: a half-written entry never has
the final name, and an entry whose files do not match their manifest (truncated, flipped bytes,
missing) is discarded and rebuilt.

The key covers everything that makes an artifact wrong for this host or this model: the model
file's sha256, the runtime and its library versions, torch's version, the CPU model and its flag
set (an artifact compiled for AVX-512/AMX would crash or silently pick other kernels on an AVX2
host), the conversion options, and the thread count only for runtimes whose artifact depends on it
(none, today: see each backend's ``THREADS_IN_KEY``).

Pure standard library: the daemon can compute keys without importing torch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time

from ..store import file_digest, sha256_file as _sha256  # noqa: F401  (file_digest: part of this module's API)

CACHE_FORMAT = 2
MANIFEST = "manifest.json"



def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's feature flags ("flags" on x86, "Features" on ARM) as one sorted string."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip().lower() in ("flags", "features"):
                    return " ".join(sorted(set(v.split())))
    except OSError:
        pass
    return "unknown"


def cpu_identity() -> dict:
    from ..topology import read_cpu_model
    flags = cpu_flags()
    return {"cpu_model": read_cpu_model(), "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def make_key(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def entry_dir(cache_dir: str, runtime: str, key: str) -> str:
    return os.path.join(cache_dir, f"{runtime}-{key}")


class BadEntry(Exception):
    """A cache entry that must not be used (why is the message)."""


def read_entry(path: str, key: str, verify_hashes: bool = True) -> dict:
    """The manifest of a complete, intact entry; raises BadEntry otherwise (FileNotFoundError if absent)."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            man = json.loads(f.read())
    except FileNotFoundError:
        if os.path.isdir(path):
            raise BadEntry("manifest missing") from None
        raise
    except (OSError, ValueError) as e:
        raise BadEntry(f"manifest unreadable ({e})") from None
    if not isinstance(man, dict) or man.get("format") != CACHE_FORMAT or man.get("key") != key:
        raise BadEntry("manifest format or key does not match")
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        raise BadEntry("manifest lists no files")
    for name, rec in files.items():
        fp = os.path.join(path, name)
        try:
            size = os.path.getsize(fp)
        except OSError:
            raise BadEntry(f"{name} missing") from None
        if size != rec.get("bytes"):
            raise BadEntry(f"{name} is {size} bytes, manifest says {rec.get('bytes')}")
        if verify_hashes and _sha256(fp) != rec.get("sha256"):
            raise BadEntry(f"{name} does not match its sha256")
    return man


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(cache_dir: str) -> None:
    """Remove temp build dirs and discarded entries left by processes that died."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for n in names:
        if not (n.startswith(".tmp-") or n.startswith(".old-")):
            continue
        parts = n.split("-")
        try:
            pid = int(parts[-2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(os.path.join(cache_dir, n), ignore_errors=True)


class EntryBuilder:
    """Build an entry in a temp dir, then publish it atomically::

        with EntryBuilder(cache_dir, runtime, key) as b:
            write files under b.dir
            man = b.publish(extra_manifest_fields)
    Leaving the block without publish() (an exception) removes the temp dir."""

    def __init__(self, cache_dir: str, runtime: str, key: str):
        self.cache_dir = cache_dir
        self.runtime = runtime
        self.key = key
        self.final = entry_dir(cache_dir, runtime, key)
        os.makedirs(cache_dir, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix=f".tmp-{runtime}-{key}-{os.getpid()}-", dir=cache_dir)
        self.published = False

    def __enter__(self) -> "EntryBuilder":
        return self

    def __exit__(self, *exc) -> None:
        if not self.published:
            shutil.rmtree(self.dir, ignore_errors=True)

    def publish(self, fields: dict) -> dict:
        files = {}
        for root, _, names in os.walk(self.dir):
            for n in names:
                fp = os.path.join(root, n)
                rel = os.path.relpath(fp, self.dir)
                with open(fp, "rb") as f:
                    os.fsync(f.fileno())
                files[rel] = {"bytes": os.path.getsize(fp), "sha256": _sha256(fp)}
        for root, dirs, _ in os.walk(self.dir):
            for d in dirs:
                _fsync_dir(os.path.join(root, d))
        man = dict(fields, format=CACHE_FORMAT, key=self.key, runtime=self.runtime, files=files,
                   created=time.time())
        data = json.dumps(man, indent=1, sort_keys=True).encode()
        with open(os.path.join(self.dir, MANIFEST), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(self.dir, 0o755 & ~_umask())
        _fsync_dir(self.dir)
        for attempt in range(3):
            if os.path.lexists(self.final):
                try:
                    read_entry(self.final, self.key, verify_hashes=False)
                    # Another process published the same key meanwhile: keep the first one.
                    shutil.rmtree(self.dir, ignore_errors=True)
                    self.published = True
                    return read_entry(self.final, self.key, verify_hashes=False)
                except (BadEntry, FileNotFoundError):
                    discard(self.final)
            try:
                os.rename(self.dir, self.final)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt < 2:
                    continue
                raise
            self.published = True
            _fsync_dir(self.cache_dir)
            return man
        raise OSError(f"could not publish cache entry {self.final}")


def discard(path: str) -> None:
    """Move a bad entry out of the way (atomically), then delete it."""
    trash = os.path.join(os.path.dirname(path), f".old-{os.path.basename(path)}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old
