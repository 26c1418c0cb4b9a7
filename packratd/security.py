"""Who may talk to packratd: file-system permissions for ipc sockets, CURVE for TCP.

Local (ipc://, the default)
    Clients and operators are different principals.  The runtime directory is mode 0750, owned by
    packratd's user and, with ``server.socket_group`` set, by that group (:func:`prepare_runtime_dir`):
    group members may reach the sockets in it but cannot create, remove or replace any (so nobody but
    packratd can re-bind a socket there and pose as the daemon).  Sockets are created while the
    daemon's umask is 0077, i.e. owner-only from the instant they exist; then the client socket
    ``packratd.sock`` is opened to its group (0660, :func:`secure_ipc`), the control socket
    ``control.sock`` stays 0600 (or 0660 for ``server.admin_group``; the directory then gets the
    others-search bit 0751 so admins outside the client group can reach it -- they can list nothing),
    and the worker socket stays 0600: a peer there could pose as a worker, receive other clients'
    inputs and forge results.  Linux checks write permission on the socket file (and search
    permission on every directory above it) at connect(2), so everyone else gets EACCES from the
    kernel, before ZeroMQ sees anything.

Remote (tcp://)
    TCP listening is off by default: ``server.listen`` is an ipc:// endpoint unless it is changed, and
    a tcp:// endpoint binds only the address it names (give an interface address, not ``*`` or
    0.0.0.0, unless every interface is meant).  A TCP listener uses CURVE (CurveZMQ: Curve25519
    encryption and client authentication): the server has a long-term keypair
    (:func:`load_or_create_server_keys`, secret file 0600), clients must know the server's public key,
    and only clients whose public key file is in the allowed-clients directory get through
    (:func:`start_authenticator`, a ZAP handler thread).  A client with an unknown key fails the
    handshake: the server socket never receives its messages.  Add a client by copying its
    ``.key`` (public) file there and reloading the authenticator (``configure_curve`` again).
"""
from __future__ import annotations

import grp
import logging
import os
import shutil
import stat
import tempfile

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("packratd.security")

SERVER_KEY_NAME = "server"
PUBLIC_CERT_TEMPLATE = """#   ZeroMQ CURVE Public Certificate (packratd server; restored from the secret file)
#   Exchange securely, or verify the contents of this file after exchange.

metadata
curve
    public-key = "{key}"
"""


# Directories prepare_runtime_dir must never chmod 0770, whoever owns them.
SYSTEM_DIRS = frozenset({"/", "/run", "/var/run", "/var", "/var/lib", "/var/tmp", "/tmp", "/dev", "/dev/shm", "/etc",
                         "/home", "/root", "/usr", "/opt", "/srv", "/mnt", "/media"})


class SecurityError(Exception):
    """A permission or key problem that stops the daemon from starting safely; the message says what to fix."""


def resolve_group(group: str | int | None) -> int | None:
    """Group name or numeric gid (int or digit string) -> gid; None/"" -> None.  Unknown names raise SecurityError."""
    if group is None or group == "":
        return None
    if isinstance(group, int):
        if group < 0:
            raise SecurityError(f"invalid gid {group}")
        return group
    g = str(group).strip()
    if g.isdigit():
        return int(g)
    try:
        return grp.getgrnam(g).gr_gid
    except KeyError:
        raise SecurityError(f"unknown group {g!r} (server.socket_group): create it (groupadd {g}) "
                            "or give an existing group name or a numeric gid") from None


def _chown_group(path: str, gid: int, what: str) -> None:
    try:
        os.chown(path, -1, gid, follow_symlinks=False)
    except PermissionError:
        raise SecurityError(f"cannot give {what} {path!r} to gid {gid}: permission denied (run as root, "
                            "or as a user that is a member of that group)") from None


def prepare_runtime_dir(path: str, group: str | int | None = None, mode: int = 0o750,
                        traverse_others: bool = False) -> None:
    """Create the runtime directory (sockets live here) mode 0750 (0751 with ``traverse_others``);
    chmod it even if it exists.

    With a group (name or gid) the directory is group-owned by it so members can reach the sockets.
    Refuses a symlink, a non-directory, a directory owned by another user (someone else could
    then swap the sockets), and shared directories (sticky bit like /tmp, or /, /run, /var/lib ...):
    chmod 0750 on those would lock everyone else out of them."""
    gid = resolve_group(group)
    if os.path.realpath(path) in SYSTEM_DIRS:
        raise SecurityError(f"runtime directory {path!r} is a system directory; use a dedicated one such as /run/packratd")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"runtime directory {path!r} is not a directory (a symlink or a file); remove it")
    if st.st_mode & stat.S_ISVTX:
        raise SecurityError(f"runtime directory {path!r} is a shared directory (sticky bit, like /tmp); "
                            "use a dedicated subdirectory")
    if st.st_uid != os.geteuid():
        raise SecurityError(f"runtime directory {path!r} is owned by uid {st.st_uid}, not by packratd's uid "
                            f"{os.geteuid()}; remove it or chown it")
    if gid is not None:
        _chown_group(path, gid, "runtime directory")
    os.chmod(path, mode | (0o001 if traverse_others else 0))


def ipc_path(endpoint: str) -> str | None:
    """The file of an ipc:// endpoint, None for other transports."""
    return endpoint[6:] if endpoint.startswith("ipc://") else None


def remove_ipc(endpoint: str) -> None:
    """After close: remove an ipc endpoint's socket file, if it has one and it is still there."""
    path = ipc_path(endpoint)
    if path and not path.startswith("@"):
        try:
            os.unlink(path)
        except OSError:
            pass


def secure_ipc(endpoint: str, group: str | int | None = None, mode: int = 0o660) -> None:
    """After bind: chmod an ipc socket file (0660 by default) and chown it to the group.

    A no-op for tcp:// (and other non-ipc) endpoints.  Abstract sockets (``ipc://@name``) have no file
    and so no permissions: refused."""
    path = ipc_path(endpoint)
    if path is None:
        return
    if path.startswith("@"):
        raise SecurityError(f"{endpoint}: abstract-namespace sockets cannot be access-controlled; "
                            "use a path under server.runtime_dir")
    gid = resolve_group(group)
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise SecurityError(f"{path!r} is not a socket")
    if gid is not None:
        _chown_group(path, gid, "socket")
    os.chmod(path, mode)


# ---- CURVE ------------------------------------------------------------------------------------
def _check_secret_file(path: str) -> None:
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise SecurityError(f"CURVE secret key {path!r} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                            "treat it as leaked: delete it so a new one is made (and redistribute the public key), "
                            "or chmod 600 it if it never left this host")
    if st.st_uid != os.geteuid():
        raise SecurityError(f"CURVE secret key {path!r} is owned by uid {st.st_uid}, not packratd's uid {os.geteuid()}")


def load_or_create_server_keys(keys_dir: str) -> tuple[str, str]:
    """The server's CURVE keypair files (public, secret) in keys_dir; created on first use.

    The secret file is mode 0600, the public one 0644 (clients need it), the directory 0755.  New keys
    are written in a private temporary directory and renamed into place, so a crash never leaves half
    a keypair and the secret is never readable by others, not even for an instant."""
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support; TCP listening needs it")
    os.makedirs(keys_dir, mode=0o755, exist_ok=True)
    public = os.path.join(keys_dir, SERVER_KEY_NAME + ".key")
    secret = os.path.join(keys_dir, SERVER_KEY_NAME + ".key_secret")
    if os.path.exists(secret):
        _check_secret_file(secret)
        try:
            pub, sec = zmq.auth.load_certificate(secret)
        except (ValueError, OSError) as e:
            raise SecurityError(f"cannot read CURVE secret key {secret!r}: {e}") from None
        if not sec:
            raise SecurityError(f"{secret!r} holds no secret key")
        if not os.path.exists(public):       # restore the public half from the secret file
            tmp = os.path.join(keys_dir, f".{SERVER_KEY_NAME}.key.{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(PUBLIC_CERT_TEMPLATE.format(key=pub.decode("ascii")))
            os.chmod(tmp, 0o644)
            os.replace(tmp, public)
        return public, secret
    tmp = tempfile.mkdtemp(prefix=".keys-", dir=keys_dir)     # mode 0700
    try:
        p, s = zmq.auth.create_certificates(tmp, SERVER_KEY_NAME)
        os.chmod(s, 0o600)
        os.chmod(p, 0o644)
        os.replace(s, secret)
        os.replace(p, public)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("created CURVE server keypair in %s; give clients %s", keys_dir, public)
    return public, secret


def server_public_key(keys_dir_or_file: str) -> bytes:
    """The server's Z85 public key (what clients pass as curve_server_key)."""
    path = keys_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, SERVER_KEY_NAME + ".key")
    return zmq.auth.load_certificate(path)[0]


def start_authenticator(ctx: zmq.Context, allowed_clients_dir: str) -> ThreadAuthenticator:
    """Start the ZAP handler for ctx: CURVE clients are let in only if their public key file is in
    allowed_clients_dir (zmq.auth certificate files, ``*.key``).  Sockets without CURVE (NULL
    mechanism: the ipc sockets) are not affected.  Call ``.stop()`` before ``ctx.term()``.

    To pick up added or removed client keys, call ``auth.configure_curve(domain='*', location=dir)`` again."""
    if not os.path.isdir(allowed_clients_dir):
        raise SecurityError(f"allowed CURVE clients directory {allowed_clients_dir!r} does not exist; create it and "
                            "put each client's public .key file there")
    n = sum(1 for f in os.listdir(allowed_clients_dir) if f.endswith(".key"))
    if n == 0:
        log.warning("no client keys (*.key) in %s: no TCP client can connect until one is added", allowed_clients_dir)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("packratd.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=allowed_clients_dir)
    return auth


def make_curve_server(sock: zmq.Socket, server_secret_file: str) -> None:
    """Make sock a CURVE server with the keypair in server_secret_file.  Call before bind()."""
    _check_secret_file(server_secret_file)
    pub, sec = zmq.auth.load_certificate(server_secret_file)
    if not sec:
        raise SecurityError(f"{server_secret_file!r} holds no secret key")
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_server = True
