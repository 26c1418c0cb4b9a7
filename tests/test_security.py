"""Access control, tested for real: another uid against the kernel's socket permissions, CURVE against ZAP.

The ipc tests fork a child that drops to uid 65534 ("nobody") with or without a supplementary
group and tries to connect; they need root (to switch uid) and skip otherwise.  The directories are
made under /tmp with 0711 parents, so that uid 65534 *could* reach the sockets if packratd's
modes were not applied (a control case checks exactly that).
"""
from __future__ import annotations

import errno
import grp
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time

import pytest
import zmq
import zmq.auth

from packratd import protocol as P
from packratd import security as S

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def _unused_gid() -> int:
    for gid in range(46000, 47000):
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
    raise RuntimeError("no free gid")


GID = _unused_gid()     # the "packratd clients" group; numeric, so no /etc/group change is needed


# ---- running code as another uid ------------------------------------------------------------------
def run_as(fn, uid: int, gid: int, groups: list[int], timeout: float = 20.0, server=None):
    """Fork; in the child drop to uid/gid/groups and return fn()'s (JSON) result.

    While the child runs, the parent answers on server (a zmq ROUTER) and records what it received:
    returns (child result, list of messages the server got)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # child: no pytest, no parent zmq context
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            assert os.getuid() == uid and os.geteuid() == uid and set(os.getgroups()) <= set(groups) | {gid}
            data = {"result": fn()}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            data = {"error": repr(e)}
            code = 1
        try:
            os.write(w, json.dumps(data).encode())
        finally:
            os._exit(code)
    os.close(w)
    got, buf = [], b""
    poller = zmq.Poller()
    poller.register(r, zmq.POLLIN)
    if server is not None:
        poller.register(server, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ev = dict(poller.poll(100))
            if server is not None and server in ev:
                frames = server.recv_multipart()
                got.append([f.decode(errors="replace") for f in frames[1:]])
                server.send_multipart([frames[0], b"", b"pong"])
            if r in ev:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                buf += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("child did not finish")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    data = json.loads(buf)
    if "error" in data:
        pytest.fail(f"child failed: {data['error']}")
    return data["result"], got


def probe(path: str, zmq_timeout_ms: int = 1500):
    """In the child: what the kernel and ZeroMQ say when this uid tries the socket at path."""
    def fn():
        out = {}
        try:
            os.stat(path)
            out["stat"] = "ok"
        except OSError as e:
            out["stat"] = errno.errorcode[e.errno]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            out["connect"] = "ok"
        except OSError as e:
            out["connect"] = errno.errorcode[e.errno]
        finally:
            s.close()
        ctx = zmq.Context()
        q = ctx.socket(zmq.REQ)
        q.setsockopt(zmq.LINGER, 0)
        q.connect("ipc://" + path)
        q.send(b"ping from uid %d" % os.getuid())
        out["zmq"] = q.recv().decode() if q.poll(zmq_timeout_ms) else None
        q.close(0)
        ctx.term()
        return out
    return fn


@pytest.fixture
def traversable_dir():
    """A directory uid 65534 can traverse (0711 up to /), unlike pytest's tmp_path (0700)."""
    d = tempfile.mkdtemp(prefix="packratd-sec-", dir="/tmp")
    os.chmod(d, 0o711)
    for p in ("/tmp",):
        assert os.stat(p).st_mode & 0o001, f"{p} is not searchable by others"
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _router(ctx, endpoint):
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    return s


# ---- runtime dir and socket modes -------------------------------------------------------------------
def test_prepare_runtime_dir_creates_and_fixes_modes(tmp_path):
    d = tmp_path / "run"
    S.prepare_runtime_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750            # the group may reach sockets, not add or remove them
    os.chmod(d, 0o777)                                          # exists with a bad mode: fixed
    S.prepare_runtime_dir(str(d), None)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    S.prepare_runtime_dir(str(d), None, traverse_others=True)   # an admin group other than the client group
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o751


@needs_root
def test_prepare_runtime_dir_group_by_name_or_gid(tmp_path):
    d = tmp_path / "run"
    S.prepare_runtime_dir(str(d), str(GID))
    assert os.stat(d).st_gid == GID
    name = grp.getgrgid(NOBODY).gr_name                         # "nogroup" on Debian, "nobody" elsewhere
    S.prepare_runtime_dir(str(d), name)
    assert os.stat(d).st_gid == NOBODY
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750


def test_unknown_group_and_unsafe_paths_are_refused(tmp_path):
    with pytest.raises(S.SecurityError, match="unknown group 'no-such-group-packratd'"):
        S.prepare_runtime_dir(str(tmp_path / "run"), "no-such-group-packratd")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(S.SecurityError, match="not a directory"):
        S.prepare_runtime_dir(str(tmp_path / "link"))
    with pytest.raises(S.SecurityError, match="system directory"):
        S.prepare_runtime_dir("/tmp")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(S.SecurityError, match="sticky"):
        S.prepare_runtime_dir(str(shared))
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777                     # left alone
    with pytest.raises(S.SecurityError, match="abstract"):
        S.secure_ipc("ipc://@packratd-test", None)
    S.secure_ipc("tcp://127.0.0.1:5555", "no-such-group-packratd")   # tcp: nothing to do, not even a lookup


@needs_root
def test_prepare_runtime_dir_refuses_a_dir_owned_by_someone_else(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(S.SecurityError, match="owned by uid 65534"):
        S.prepare_runtime_dir(str(d))


def test_secure_ipc_sets_socket_mode_and_group(tmp_path, ctx):
    S.prepare_runtime_dir(str(tmp_path / "run"))
    ep = f"ipc://{tmp_path}/run/s.sock"
    _router(ctx, ep)
    S.secure_ipc(ep, str(os.getegid()))
    st = os.stat(ep[6:])
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
    S.secure_ipc(ep, None, mode=0o600)                          # the worker socket: owner only
    assert stat.S_IMODE(os.stat(ep[6:]).st_mode) == 0o600


@needs_root
def test_other_uid_cannot_connect_group_member_can(traversable_dir, ctx):
    run = os.path.join(traversable_dir, "run")
    S.prepare_runtime_dir(run, str(GID))
    path = os.path.join(run, "packratd.sock")
    server = _router(ctx, "ipc://" + path)
    S.secure_ipc("ipc://" + path, GID)

    # uid 65534 without the group: the kernel refuses at the directory; ZeroMQ never delivers anything.
    out, got = run_as(probe(path), NOBODY, NOBODY, [], server=server)
    assert out == {"stat": "EACCES", "connect": "EACCES", "zmq": None}, out
    assert got == []
    # The same uid as a member of the group gets through and is answered.
    out, got = run_as(probe(path), NOBODY, NOBODY, [GID], server=server)
    assert out == {"stat": "ok", "connect": "ok", "zmq": "pong"}, out
    assert got == [["", f"ping from uid {NOBODY}"]]


@needs_root
def test_socket_mode_alone_keeps_other_uids_out(traversable_dir, ctx):
    """Even where the directory is traversable (0711), the 0660 socket itself refuses non-members."""
    path = os.path.join(traversable_dir, "s.sock")
    server = _router(ctx, "ipc://" + path)
    S.secure_ipc("ipc://" + path, GID)
    out, got = run_as(probe(path), NOBODY, NOBODY, [], server=server)
    assert out == {"stat": "ok", "connect": "EACCES", "zmq": None}, out
    assert got == []
    out, got = run_as(probe(path), NOBODY, NOBODY, [GID], server=server)
    assert out["connect"] == "ok" and out["zmq"] == "pong", out


@needs_root
def test_control_without_modes_anyone_gets_in(traversable_dir, ctx):
    """The control case: the same setup with permissive modes lets uid 65534 in, so the tests above
    fail if prepare_runtime_dir / secure_ipc stop applying their modes."""
    run = os.path.join(traversable_dir, "open")
    os.mkdir(run)
    os.chmod(run, 0o777)
    path = os.path.join(run, "s.sock")
    server = _router(ctx, "ipc://" + path)
    os.chmod(path, 0o777)
    out, got = run_as(probe(path), NOBODY, NOBODY, [], server=server)
    assert out == {"stat": "ok", "connect": "ok", "zmq": "pong"}, out
    # ...and a group member is refused by a socket left at the umask default (0755): secure_ipc is needed.
    old = os.umask(0o022)
    try:
        path2 = os.path.join(traversable_dir, "umask.sock")
        _router(ctx, "ipc://" + path2)
    finally:
        os.umask(old)
    os.chown(path2, -1, GID)
    out, _ = run_as(probe(path2, 300), NOBODY, NOBODY, [GID])
    assert out["connect"] == "EACCES", out


# ---- CURVE over TCP ---------------------------------------------------------------------------------
@pytest.fixture
def curve_server(tmp_path, ctx):
    keys = tmp_path / "keys"
    allowed = tmp_path / "clients"
    allowed.mkdir()
    _, good = zmq.auth.create_certificates(str(allowed), "good")   # authorized before the authenticator starts
    good_dir = tmp_path / "good"                                     # the client keeps its secret elsewhere
    good_dir.mkdir()
    good = shutil.copy(good, good_dir)
    pub_file, sec_file = S.load_or_create_server_keys(str(keys))
    auth = S.start_authenticator(ctx, str(allowed))
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    S.make_curve_server(sock, sec_file)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield {"sock": sock, "endpoint": f"tcp://127.0.0.1:{port}", "server_key": S.server_public_key(str(keys)),
           "allowed": allowed, "auth": auth, "tmp": tmp_path, "good": good}
    sock.close(0)
    auth.stop()


def _client(ctx, endpoint, server_key=None, keyfile=None):
    c = ctx.socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        pub, sec = zmq.auth.load_certificate(keyfile)
        c.curve_serverkey, c.curve_publickey, c.curve_secretkey = server_key, pub, sec
    c.connect(endpoint)
    return c


def _roundtrip(srv, client, timeout_ms=3000):
    client.send(b"hello")
    server_got = None
    if srv.poll(timeout_ms):
        ident, *body = srv.recv_multipart()
        server_got = body
        srv.send_multipart([ident, b"echo:" + body[0]])
    client_got = client.recv() if client.poll(timeout_ms if server_got else 200) else None
    return server_got, client_got


def test_curve_authorized_client_gets_through_unknown_key_does_not(curve_server, ctx):
    srv, ep, skey, good = (curve_server[k] for k in ("sock", "endpoint", "server_key", "good"))
    stranger_dir = curve_server["tmp"] / "stranger"
    stranger_dir.mkdir()
    _, stranger = zmq.auth.create_certificates(str(stranger_dir), "stranger")
    other_server_pub, _ = zmq.auth.load_certificate(zmq.auth.create_certificates(str(stranger_dir), "fake-server")[0])

    ok = _client(ctx, ep, skey, good)
    assert _roundtrip(srv, ok) == ([b"hello"], b"echo:hello")

    for name, cl in (("unknown client key", _client(ctx, ep, skey, stranger)),
                     ("no CURVE at all", _client(ctx, ep)),
                     ("allowed key, wrong server key", _client(ctx, ep, other_server_pub, good))):
        server_got, client_got = _roundtrip(srv, cl, timeout_ms=1500)
        assert server_got is None, f"{name}: the server received {server_got}"
        assert client_got is None, name
        cl.close(0)

    assert _roundtrip(srv, ok) == ([b"hello"], b"echo:hello")   # the authorized client is unaffected
    ok.close(0)


def test_curve_client_added_after_start_needs_a_reload(curve_server, ctx):
    srv, ep, skey = curve_server["sock"], curve_server["endpoint"], curve_server["server_key"]
    _, late = zmq.auth.create_certificates(str(curve_server["allowed"]), "late")
    c = _client(ctx, ep, skey, late)
    # configure_curve reads the directory when called: the key added after start is not known yet...
    assert _roundtrip(srv, c, timeout_ms=1000) == (None, None)
    curve_server["auth"].configure_curve(domain="*", location=str(curve_server["allowed"]))
    c.close(0)
    c = _client(ctx, ep, skey, late)
    assert _roundtrip(srv, c) == ([b"hello"], b"echo:hello")
    c.close(0)


def test_packratd_client_speaks_curve_to_a_curve_server(curve_server, ctx):
    """packratd.client.Client's curve_* arguments work against make_curve_server (ping round trip)."""
    from packratd.client import Client
    srv, ep, skey = curve_server["sock"], curve_server["endpoint"], curve_server["server_key"]
    pub, sec = zmq.auth.load_certificate(curve_server["good"])
    c = Client(ep, timeout=5, ctx=ctx, curve_server_key=skey, curve_keypair=(pub, sec))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if srv.poll(100):
                ident, *body = srv.recv_multipart()
                req = P.parse_request(body, 1 << 20)
                srv.send_multipart([ident, P.encode_header({"v": P.VERSION, "id": req.id, "status": "ok", "tensors": []})])

    t = threading.Thread(target=serve)
    t.start()
    try:
        c.ping()
    finally:
        stop.set()
        t.join()
        c.close()


def test_ipc_null_sockets_unaffected_by_the_authenticator(curve_server, ctx, tmp_path):
    """The daemon's ipc sockets (workers, control) share the context with the ZAP handler: they must still work."""
    ep = f"ipc://{tmp_path}/null.sock"
    srv = _router(ctx, ep)
    other = zmq.Context()
    try:
        c = _client(other, ep)
        assert _roundtrip(srv, c) == ([b"hello"], b"echo:hello")
        c.close(0)
    finally:
        other.destroy(linger=0)


def test_server_keys_modes_and_reuse(tmp_path):
    keys = str(tmp_path / "keys")
    pub, sec = S.load_or_create_server_keys(keys)
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    assert sorted(os.listdir(keys)) == ["server.key", "server.key_secret"]     # no temp files left
    k1 = zmq.auth.load_certificate(sec)
    assert k1[1] and zmq.auth.load_certificate(pub) == (k1[0], None)
    assert S.load_or_create_server_keys(keys) == (pub, sec)
    assert zmq.auth.load_certificate(sec) == k1                                # reused, not regenerated
    os.unlink(pub)                                                             # public half lost: restored
    S.load_or_create_server_keys(keys)
    assert S.server_public_key(keys) == k1[0] and stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    os.chmod(sec, 0o640)                                                       # a secret readable by a group
    with pytest.raises(S.SecurityError, match="readable by others"):
        S.load_or_create_server_keys(keys)
    c = zmq.Context()
    try:
        with pytest.raises(S.SecurityError, match="readable by others"):
            S.make_curve_server(c.socket(zmq.ROUTER), sec)
    finally:
        c.destroy(linger=0)


def test_start_authenticator_needs_the_clients_dir(tmp_path, ctx):
    with pytest.raises(S.SecurityError, match="does not exist"):
        S.start_authenticator(ctx, str(tmp_path / "missing"))


# ---- end to end: the real daemon ------------------------------------------------------------------


def client_probe(endpoint: str):
    """In the child: a packratd ping over the real client library."""
    def fn():
        from packratd.client import Client
        c = Client(endpoint, timeout=2, ctx=zmq.Context())
        try:
            c.ping()
            return "pong"
        except TimeoutError:
            return None
        finally:
            c.close()
    return fn


def control_probe(path: str):
    """In the child: a packratctl-style status request, and what the kernel says about the runtime dir."""
    def fn():
        from packratd.control import ControlClient, ControlError
        out = {}
        try:
            out["status"] = ControlClient("ipc://" + path, timeout=3).call("status")["state"]
        except ControlError as e:
            out["status"] = "refused: " + str(e)[:80]
        run = os.path.dirname(path)
        for what, op in (("unlink", lambda: os.unlink(os.path.join(run, "packratd.sock"))),
                         ("create", lambda: open(os.path.join(run, "packratd.sock.evil"), "w").close()),
                         ("rename", lambda: os.rename(os.path.join(run, "control.sock"), os.path.join(run, "x")))):
            try:
                op()
                out[what] = "ok"
            except OSError as e:
                out[what] = errno.errorcode[e.errno]
        return out
    return fn


ADMIN_GID = GID + 1 if GID + 1 < 47000 else GID - 1


@pytest.mark.slow
@needs_root
def test_clients_and_operators_are_different_principals(traversable_dir, daemon, tiny_model):
    """Two real uids' worth of principals: a client (in server.socket_group) may infer but not operate;
    an operator (in server.admin_group) may operate; neither can replace a socket; others can do nothing."""
    import packratd.client  # noqa: F401 - imported before the fork, so the child needs no file access
    import packratd.control  # noqa: F401
    run = os.path.join(traversable_dir, "run")
    d = daemon(tiny_model, plan="1x1:4", wait=False,
               extra=["--runtime-dir", run, "--set", f"server.socket_group={GID}", "--set", f"server.admin_group={ADMIN_GID}"])
    d.runtime_dir, d.endpoint = run, f"ipc://{run}/packratd.sock"
    d.wait_serving()
    st = os.stat(run)
    assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_gid == GID          # admins outside the client group may traverse
    for name, mode, gid in (("packratd.sock", 0o660, GID), ("control.sock", 0o660, ADMIN_GID), ("workers.sock", 0o600, 0)):
        st = os.stat(os.path.join(run, name))
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, gid), name
    control = os.path.join(run, "control.sock")
    client_uid, admin_uid = NOBODY, NOBODY - 1          # two uids with no other rights on this host
    # nobody in neither group: no inference, no control
    assert run_as(client_probe(d.endpoint), client_uid, NOBODY, [])[0] is None
    out, _ = run_as(control_probe(control), client_uid, NOBODY, [])
    assert out["status"].startswith("refused") and out["unlink"] == "EACCES", out
    # a client: inference yes, control no, and it cannot unlink, create or rename anything in the runtime dir
    assert run_as(client_probe(d.endpoint), client_uid, NOBODY, [GID])[0] == "pong"
    out, _ = run_as(control_probe(control), client_uid, NOBODY, [GID])
    assert out["status"].startswith("refused"), out
    assert (out["unlink"], out["create"], out["rename"]) == ("EACCES", "EACCES", "EACCES"), out
    out, _ = run_as(probe(control, 300), client_uid, NOBODY, [GID])        # the kernel says no, not only packratctl
    assert out["connect"] == "EACCES", out
    # group members still cannot reach the worker socket
    out, _ = run_as(probe(os.path.join(run, "workers.sock"), 300), client_uid, NOBODY, [GID])
    assert out["connect"] == "EACCES", out
    # an operator (another uid, in the admin group only): control yes, inference no, still no socket swapping
    out, _ = run_as(control_probe(control), admin_uid, NOBODY, [ADMIN_GID])
    assert out["status"] == "serving", out
    assert (out["unlink"], out["create"], out["rename"]) == ("EACCES", "EACCES", "EACCES"), out
    assert run_as(client_probe(d.endpoint), admin_uid, NOBODY, [ADMIN_GID])[0] is None
    assert d.control()["requests"] == 0 and d.control()["state"] == "serving"


@pytest.mark.slow
@needs_root
def test_without_an_admin_group_only_packratds_user_operates(traversable_dir, daemon, tiny_model):
    run = os.path.join(traversable_dir, "run")
    d = daemon(tiny_model, plan="1x1:4", wait=False, extra=["--runtime-dir", run, "--set", f"server.socket_group={GID}"])
    d.runtime_dir, d.endpoint = run, f"ipc://{run}/packratd.sock"
    d.wait_serving()
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(os.path.join(run, "control.sock")).st_mode) == 0o600
    out, _ = run_as(control_probe(os.path.join(run, "control.sock")), NOBODY, NOBODY, [GID])
    assert out["status"].startswith("refused"), out
    # drain, reconfigure, profile --refresh and reload are only on that socket: a client cannot reach any of them
    assert d.control("status")["state"] == "serving"


@pytest.mark.slow
def test_daemon_tcp_listener_requires_an_allowed_curve_key(daemon, tiny_model, tmp_path):
    import numpy as np
    from packratd.client import Client
    clients, mine, theirs = tmp_path / "clients", tmp_path / "mine", tmp_path / "theirs"
    for p in (clients, mine, theirs):
        p.mkdir()
    pub, sec = zmq.auth.create_certificates(str(mine), "app")
    shutil.copy(pub, clients)
    _, stranger = zmq.auth.create_certificates(str(theirs), "stranger")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = f"tcp://127.0.0.1:{port}"
    keys = tmp_path / "serverkeys"
    d = daemon(tiny_model, plan="1x1:4", wait=False,
               extra=["--listen", ep, "--set", f"server.curve_clients_dir={clients}", "--set", f"server.curve_keys_dir={keys}"])
    d.wait_state(timeout=120.0)
    assert stat.S_IMODE(os.stat(keys / "server.key_secret").st_mode) == 0o600
    skey = S.server_public_key(str(keys))
    c = Client(ep, timeout=10, curve_server_key=skey, curve_keypair=zmq.auth.load_certificate(sec))
    (y,) = c.infer(np.ones((2, 64), np.float32))
    assert y.shape[0] == 2
    c.close()
    for name, kw in (("unknown key", {"curve_server_key": skey, "curve_keypair": zmq.auth.load_certificate(stranger)}),
                     ("no CURVE", {})):
        c = Client(ep, timeout=1.5, **kw)
        with pytest.raises(TimeoutError):
            c.ping()
        c.close()
    assert d.control()["requests"] == 1
