"""The Open Inference Protocol gateway (packratd/oip): real tritonclient (HTTP and gRPC) and curl against
the real gateway process in front of a real packratd.

Outputs are compared with the model run in-process.  Tolerance rtol=1e-4, atol=1e-5: the worker runs
the same exported graph on other rows beside these (other batch, perhaps another runtime), so results
may differ by float32 rounding (eps 1.2e-7) accumulated over dot products of at most 64 terms, i.e. a
few 1e-6 at most; any real mistake (wrong rows, inputs swapped, bytes misread) is off by 1e-2 or more.

Three daemons: tiny_two_input (most tests, one gateway for the module), slow_mlp (error mapping: a
worker busy long enough to queue behind it), tiny_mlp (the `daemon` fixture, one test).  All are
tools/models.py models.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import zmq
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT, DaemonProc, load_module

RTOL, ATOL = 1e-4, 1e-5
TWO = "tiny_two_input"
SLOW_ROWS = 32


# ---- the gateway process -----------------------------------------------------------------------------
class Gateway:
    """``python -m packratd.oip`` in a subprocess; ports are ephemeral, read back from --ports-file."""

    def __init__(self, tmp, endpoint: str, model_name: str, extra=()):
        tmp.mkdir(parents=True, exist_ok=True)
        ports_file = tmp / "ports.json"
        self.log_path = tmp / "gateway.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "packratd.oip", "--daemon", endpoint, "--http", "127.0.0.1:0",
               "--grpc", "127.0.0.1:0", "--model-name", model_name, "--ports-file", str(ports_file), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=ROOT))
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"gateway did not start (rc {self.proc.poll()}):\n{self.logs()}")
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        self.http = f"127.0.0.1:{ports['http']}"
        self.grpc = f"127.0.0.1:{ports['grpc']}"

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


def request(gw: Gateway, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One HTTP exchange on a fresh connection: (status, headers, body bytes)."""
    c = http.client.HTTPConnection(gw.http, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def post_json(gw: Gateway, obj, model=TWO):
    status, headers, body = request(gw, "POST", f"/v2/models/{model}/infer", json.dumps(obj).encode(),
                                    {"Content-Type": "application/json"})
    return status, json.loads(body)


def stays_up(gw: Gateway) -> None:
    """The gateway still answers health and a good inference after whatever came before."""
    assert gw.proc.poll() is None, gw.logs()
    status, _, _ = request(gw, "GET", "/v2/health/live")
    assert status == 200
    x, ids = two_inputs(1)
    status, body = post_json(gw, {"inputs": [json_input("x", "FP32", x), json_input("ids", "INT64", ids)]})
    assert status == 200, body


def json_input(name, datatype, a):
    return {"name": name, "datatype": datatype, "shape": list(a.shape), "data": a.ravel().tolist()}


def two_inputs(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 16)).astype(np.float32),
            rng.integers(0, 100, (rows, 8)).astype(np.int64))


def reference(module, *arrays):
    import torch
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


def raises(fn, status: str, *words):
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert e.value.status() == status, (e.value.status(), e.value.message())
    for w in words:
        assert w in e.value.message(), e.value.message()
    return e.value


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two(tmp_path_factory, two_input_model):
    d = DaemonProc(tmp_path_factory.mktemp("oip_two"), two_input_model, "1x1:8",
                   extra=["--set", "server.max_batch_size=8"])
    d.wait_serving()
    gw = Gateway(d.dir / "gw", d.endpoint, TWO)
    yield gw
    assert gw.proc.poll() is None, f"gateway died:\n{gw.logs()}"
    assert gw.stop() == 0, gw.logs()
    assert d.stop() == 0


@pytest.fixture(scope="module")
def two_module(two_input_model):
    return load_module(two_input_model)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    from tools.export_model import export
    path = str(tmp_path_factory.mktemp("oip_models") / "slow_mlp.pt2")
    export("slow_mlp", path)
    return path


@pytest.fixture(scope="module")
def slow(tmp_path_factory, slow_model):
    """slow_mlp (about 0.3-1 s per 32-row batch): the gateway is started before the daemon serves.

    ``seen`` records what the gateway answered between the daemon's loop turning and it serving."""
    d = DaemonProc(tmp_path_factory.mktemp("oip_slow"), slow_model, f"1x1:{SLOW_ROWS}",
                   extra=["--set", f"server.max_batch_size={SLOW_ROWS}", "--set", f"server.max_queue_rows={SLOW_ROWS + 8}",
                          "--set", "workers.warmup_batches=3"])    # a start-up window of a few seconds to probe
    gw = Gateway(d.dir / "gw", d.endpoint, "slow_mlp")
    seen = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        live = request(gw, "GET", "/v2/health/live")[0]
        ready = request(gw, "GET", "/v2/health/ready")[0]
        if live == 200 and ready != 200 and "infer" not in seen:
            seen["ready"] = ready
            seen["infer"] = post_json(gw, {"inputs": [json_input("x", "FP32", np.zeros((1, 256, 256), np.float32))]},
                                      model="slow_mlp")
        if ready == 200:
            break
        assert d.proc.poll() is None, d.logs()
        time.sleep(0.05)
    d.wait_serving()
    yield d, gw, seen
    assert gw.proc.poll() is None, f"gateway died:\n{gw.logs()}"
    assert gw.stop() == 0, gw.logs()
    if d.proc.poll() is None:
        d.stop()


# ---- inference with the real clients -----------------------------------------------------------------
@pytest.mark.slow
def test_tritonclient_http_and_grpc_match_the_model(two, two_module):
    hc = thttp.InferenceServerClient(two.http)
    gc = tgrpc.InferenceServerClient(two.grpc)
    for rows in (1, 5):
        x, ids = two_inputs(rows, seed=rows)
        want = reference(two_module, x, ids)
        for mod, client in ((thttp, hc), (tgrpc, gc)):
            ins = [mod.InferInput("x", list(x.shape), "FP32"), mod.InferInput("ids", list(ids.shape), "INT64")]
            ins[0].set_data_from_numpy(x)
            ins[1].set_data_from_numpy(ids)
            r = client.infer(TWO, ins, request_id=f"r{rows}")
            resp = r.get_response()
            assert (resp["id"] if mod is thttp else resp.id) == f"r{rows}"
            for i, w in enumerate(want):
                got = r.as_numpy(f"output_{i}")
                assert got.dtype == np.float32 and got.shape == w.shape
                np.testing.assert_allclose(got, w, rtol=RTOL, atol=ATOL)
        # HTTP with JSON tensors both ways, one output asked for by name.
        ins = [thttp.InferInput("x", list(x.shape), "FP32"), thttp.InferInput("ids", list(ids.shape), "INT64")]
        ins[0].set_data_from_numpy(x, binary_data=False)
        ins[1].set_data_from_numpy(ids, binary_data=False)
        r = hc.infer(TWO, ins, outputs=[thttp.InferRequestedOutput("output_1", binary_data=False)])
        out = r.get_response()["outputs"]
        assert [o["name"] for o in out] == ["output_1"] and "data" in out[0]
        np.testing.assert_allclose(r.as_numpy("output_1"), want[1], rtol=RTOL, atol=ATOL)
        # gRPC, one output asked for.
        r = gc.infer(TWO, [tgrpc.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x),
                           tgrpc.InferInput("ids", list(ids.shape), "INT64").set_data_from_numpy(ids)],
                     outputs=[tgrpc.InferRequestedOutput("output_0")])
        assert [o.name for o in r.get_response().outputs] == ["output_0"]
        np.testing.assert_allclose(r.as_numpy("output_0"), want[0], rtol=RTOL, atol=ATOL)
    hc.close()
    gc.close()


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_rows(two, two_module):
    """Many requests in flight on the gateway's one DEALER: every answer is for its own request's rows."""
    errors, done = [], []

    def run(mod, url, k):
        try:
            c = mod.InferenceServerClient(url)
            for j in range(15):
                rows = 1 + (k + j) % 4
                x, ids = two_inputs(rows, seed=1000 * k + j)
                ins = [mod.InferInput("x", list(x.shape), "FP32"), mod.InferInput("ids", list(ids.shape), "INT64")]
                ins[0].set_data_from_numpy(x)
                ins[1].set_data_from_numpy(ids)
                r = c.infer(TWO, ins)
                done.append((x, ids, r.as_numpy("output_0"), r.as_numpy("output_1")))
            c.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(mod, url, k))
               for k, (mod, url) in enumerate([(thttp, two.http), (tgrpc, two.grpc)] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(done) == 6 * 15
    for x, ids, o0, o1 in done:
        w0, w1 = reference(two_module, x, ids)
        np.testing.assert_allclose(o0, w0, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(o1, w1, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_binary_reply_layout_and_keep_alive(two, two_module):
    """The binary extension as the spec writes it, with a plain HTTP client on ONE kept-alive connection."""
    x, ids = two_inputs(3, seed=7)
    want = reference(two_module, x, ids)
    head = json.dumps({"inputs": [
        {"name": "ids", "datatype": "INT64", "shape": [3, 8], "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "x", "datatype": "FP32", "shape": [3, 16], "data": x.ravel().tolist()}],     # any order, mixed forms
        "outputs": [{"name": "output_1", "parameters": {"binary_data": True}}, {"name": "output_0"}]}).encode()
    c = http.client.HTTPConnection(two.http, timeout=30)
    try:
        for _ in range(2):
            c.request("POST", f"/v2/models/{TWO}/versions/1/infer", body=head + ids.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(head))})
            r = c.getresponse()
            body = r.read()
            assert r.status == 200, body
            n = int(r.getheader("Inference-Header-Content-Length"))
            reply = json.loads(body[:n])
            o1, o0 = reply["outputs"]
            assert o1["name"] == "output_1" and o1["parameters"]["binary_data_size"] == 3 * 4 == len(body) - n
            np.testing.assert_allclose(np.frombuffer(body[n:], np.float32), want[1], rtol=RTOL, atol=ATOL)
            assert "parameters" not in o0
            np.testing.assert_allclose(np.array(o0["data"], np.float32).reshape(o0["shape"]), want[0], rtol=RTOL, atol=ATOL)
        assert r.getheader("Connection", "keep-alive").lower() != "close"
    finally:
        c.close()


@pytest.mark.slow
def test_curl_json(two, two_module):
    x, ids = two_inputs(2, seed=3)
    body = json.dumps({"id": "c1", "inputs": [json_input("x", "FP32", x), json_input("ids", "INT64", ids)]})
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"http://{two.http}/v2/models/{TWO}/infer",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, timeout=60, check=True)
    reply = json.loads(out.stdout)
    assert reply["model_name"] == TWO and reply["id"] == "c1"
    for o, w in zip(reply["outputs"], reference(two_module, x, ids)):
        assert o["datatype"] == "FP32" and o["shape"] == list(w.shape)
        np.testing.assert_allclose(np.array(o["data"], np.float32).reshape(o["shape"]), w, rtol=RTOL, atol=ATOL)
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{two.http}/v2/health/ready"],
                         capture_output=True, timeout=60, check=True)
    assert out.stdout == b"200"


@pytest.mark.slow
def test_tiny_mlp_through_the_daemon_fixture(daemon, tiny_model, tmp_path):
    d = daemon(tiny_model, plan="1x1:8")
    gw = Gateway(tmp_path / "gw", d.endpoint, "tiny_mlp")
    try:
        x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
        (want,) = reference(load_module(tiny_model), x)
        for mod, url in ((thttp, gw.http), (tgrpc, gw.grpc)):
            c = mod.InferenceServerClient(url)
            assert c.is_server_ready() and c.is_model_ready("tiny_mlp")
            md = c.get_model_metadata("tiny_mlp")
            md = md if mod is thttp else {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                                     for t in md.inputs]}
            assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
            inp = mod.InferInput("x", [4, 64], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_allclose(c.infer("tiny_mlp", [inp]).as_numpy("output_0"), want, rtol=RTOL, atol=ATOL)
            c.close()
        out = subprocess.run(["curl", "-sS", "-d", json.dumps({"inputs": [json_input("x", "FP32", x)]}),
                              f"http://{gw.http}/v2/models/tiny_mlp/infer"], capture_output=True, timeout=60, check=True)
        (o,) = json.loads(out.stdout)["outputs"]
        np.testing.assert_allclose(np.array(o["data"], np.float32).reshape(o["shape"]), want, rtol=RTOL, atol=ATOL)
    finally:
        assert gw.stop() == 0, gw.logs()


@pytest.mark.slow
def test_grpc_typed_contents(two, two_module):
    """The non-raw gRPC form (InferTensorContents), which tritonclient never sends: a raw gRPC call."""
    from packratd.oip import proto
    x, ids = two_inputs(2, seed=11)
    want = reference(two_module, x, ids)
    with grpc.insecure_channel(two.grpc) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=proto.ModelInferRequest.SerializeToString,
                              response_deserializer=proto.ModelInferResponse.FromString)

        def infer(mutate=None):
            req = proto.ModelInferRequest(model_name=TWO, id="t")
            a = req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
            a.contents.fp32_contents.extend(x.ravel().tolist())
            b = req.inputs.add(name="ids", datatype="INT64", shape=[2, 8])
            b.contents.int64_contents.extend(ids.ravel().tolist())
            if mutate:
                mutate(req)
            return call(req, timeout=30)

        def int8_out_of_range(q):
            q.inputs[1].datatype = "INT8"
            q.inputs[1].contents.ClearField("int64_contents")
            q.inputs[1].contents.int_contents.extend([300] * 16)

        r = infer()
        assert r.id == "t" and [o.name for o in r.outputs] == ["output_0", "output_1"]
        for o, raw, w in zip(r.outputs, r.raw_output_contents, want):
            assert o.datatype == "FP32" and list(o.shape) == list(w.shape)
            np.testing.assert_allclose(np.frombuffer(raw, np.float32).reshape(w.shape), w, rtol=RTOL, atol=ATOL)
        cases = [
            (lambda q: q.inputs[0].contents.fp32_contents.append(1.0), "33 values"),
            (lambda q: q.raw_input_contents.append(b"\0" * 128), "raw_input_contents has 1 entries"),
            (lambda q: setattr(q.inputs[0], "datatype", "FP16"), "FP16 has no typed contents"),
            (int8_out_of_range, "out of range"),
            (lambda q: setattr(q.inputs[1], "datatype", "BYTES"), "BYTES"),
            (lambda q: q.outputs.add(name="nope"), "unknown output 'nope'"),
        ]
        for mutate, words in cases:
            with pytest.raises(grpc.RpcError) as e:
                infer(mutate)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), e.value.details()
        # Every other method of the service (and Triton's extras) is UNIMPLEMENTED.
        other = ch.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            other(b"", timeout=30)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    gc = tgrpc.InferenceServerClient(two.grpc)
    raises(lambda: gc.get_model_config(TWO), "StatusCode.UNIMPLEMENTED")
    gc.close()
    stays_up(two)


# ---- health and metadata -----------------------------------------------------------------------------
@pytest.mark.slow
def test_health_and_metadata(two):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{TWO}/ready", f"/v2/models/{TWO}/versions/1/ready"):
        assert request(two, "GET", path)[0] == 200, path
    status, _, body = request(two, "GET", "/v2")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "packratd" and "binary_tensor_data" in meta["extensions"]
    want = {"name": TWO, "versions": ["1"], "platform": "pytorch_torch_export",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]},
                       {"name": "ids", "datatype": "INT64", "shape": [-1, 8]}],
            "outputs": [{"name": "output_0", "datatype": "FP32", "shape": [-1, 4]},
                        {"name": "output_1", "datatype": "FP32", "shape": [-1]}]}
    for path in (f"/v2/models/{TWO}", f"/v2/models/{TWO}/versions/1"):
        status, _, body = request(two, "GET", path)
        assert status == 200 and json.loads(body) == want
    gc = tgrpc.InferenceServerClient(two.grpc)
    assert gc.is_server_live() and gc.is_server_ready() and gc.is_model_ready(TWO) and gc.is_model_ready(TWO, "1")
    md = gc.get_model_metadata(TWO)
    assert md.name == TWO and list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [(o["name"], o["datatype"], o["shape"]) for o in want["outputs"]]
    assert "binary_tensor_data" in gc.get_server_metadata().extensions
    raises(lambda: gc.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "unknown model 'nope'")
    raises(lambda: gc.is_model_ready(TWO, "2"), "StatusCode.NOT_FOUND", "no version '2'")
    gc.close()
    for method, path, status in (("GET", "/v2/models/nope", 404), ("GET", "/v2/models/nope/ready", 404),
                                 ("GET", f"/v2/models/{TWO}/versions/2", 404), ("POST", "/v2/models/nope/infer", 404),
                                 ("GET", "/v2/repository/index", 404), ("GET", "/metrics", 404), ("GET", "/", 404),
                                 ("POST", "/v2/health/live", 405), ("GET", f"/v2/models/{TWO}/infer", 405)):
        got, _, body = request(two, method, path, b"{}" if method == "POST" else None)
        assert got == status and json.loads(body)["error"], (method, path, got, body)


# ---- errors: every packratd code, every bad body -------------------------------------------------------
@pytest.mark.slow
def test_daemon_errors_map_to_400_and_invalid_argument(two):
    x, ids = two_inputs(2)
    cases = [  # (inputs, packratd code)
        ([json_input("x", "FP32", np.zeros((2, 17), np.float32)), json_input("ids", "INT64", ids)], "MODEL_MISMATCH"),
        ([json_input("x", "FP64", x.astype(np.float64)), json_input("ids", "INT64", ids)], "MODEL_MISMATCH"),
        ([json_input("x", "FP32", np.zeros((9, 16), np.float32)), json_input("ids", "INT64", np.ones((9, 8), np.int64))],
         "TOO_LARGE"),                                                   # rows > server.max_batch_size (8)
        ([json_input("x", "FP32", x), json_input("ids", "INT64", ids + 1000)], "MODEL_ERROR"),    # embedding id >= 100
    ]
    gc = tgrpc.InferenceServerClient(two.grpc)
    for inputs, code in cases:
        status, body = post_json(two, {"inputs": inputs})
        assert status == 400 and body["error"].startswith(code + ":"), (code, status, body)
        ins = []
        for t in inputs:
            i = tgrpc.InferInput(t["name"], t["shape"], t["datatype"])
            i.set_data_from_numpy(np.array(t["data"], {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}[t["datatype"]]).reshape(t["shape"]))
            ins.append(i)
        raises(lambda: gc.infer(TWO, ins), "StatusCode.INVALID_ARGUMENT", code)
    gc.close()
    stays_up(two)


def _raw_exchange(gw: Gateway, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes on a raw socket (for requests http.client will not send); read one response."""
    with socket.create_connection(gw.http.split(":"), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        n = int(headers.get("Content-Length", 0))
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), json.loads(rest[:n])


@pytest.mark.slow
def test_bad_bodies_get_clear_errors_and_the_gateway_keeps_serving(two):
    x, ids = two_inputs(2)
    good = [json_input("x", "FP32", x), json_input("ids", "INT64", ids)]
    url = f"/v2/models/{TWO}/infer"

    def binary(inputs_head: list, tail: bytes, hlen_delta: int = 0):
        head = json.dumps({"inputs": inputs_head}).encode()
        return request(two, "POST", url, head + tail, {"Inference-Header-Content-Length": str(len(head) + hlen_delta)})

    xb = {"name": "x", "datatype": "FP32", "shape": [2, 16], "parameters": {"binary_data_size": x.nbytes}}
    idsb = {"name": "ids", "datatype": "INT64", "shape": [2, 8], "parameters": {"binary_data_size": ids.nbytes}}
    cases = [  # (description, response, status, words in the error)
        ("not JSON", request(two, "POST", url, b"{not json"), 400, "not JSON"),
        ("JSON, not an object", request(two, "POST", url, b"[1, 2]"), 400, "JSON object"),
        ("no inputs", request(two, "POST", url, b"{}"), 400, "inputs"),
        ("BYTES", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], datatype="BYTES"), good[1]]}).encode()), 400, "BYTES"),
        ("UINT16", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], datatype="UINT16"), good[1]]}).encode()), 400, "UINT16"),
        ("unknown datatype", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], datatype="FLOAT"), good[1]]}).encode()), 400, "FLOAT"),
        ("float data for INT64", request(two, "POST", url, json.dumps({"inputs": [good[0], dict(good[1], data=[0.5] * 16)]}).encode()), 400, "integers"),
        ("string data", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], data=["a"] * 32), good[1]]}).encode()), 400, "numbers"),
        ("value count", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], data=[1.0] * 31), good[1]]}).encode()), 400, "31 values"),
        ("negative dim", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], shape=[2, -16]), good[1]]}).encode()), 400, "0..2^31"),
        ("huge declared shape", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], shape=[2**31, 2**31, 2**31]), good[1]]}).encode()), 400, "values for shape"),
        ("shape not a list", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], shape="2x16"), good[1]]}).encode()), 400, "list of integers"),
        ("batch sizes differ", request(two, "POST", url, json.dumps({"inputs": [good[0], json_input("ids", "INT64", np.ones((3, 8), np.int64))]}).encode()), 400, "same batch size"),
        ("unknown input", request(two, "POST", url, json.dumps({"inputs": good + [dict(good[0], name="y")]}).encode()), 400, "unknown input 'y'"),
        ("missing input", request(two, "POST", url, json.dumps({"inputs": good[:1]}).encode()), 400, "missing input 'ids'"),
        ("input twice", request(two, "POST", url, json.dumps({"inputs": good + good[:1]}).encode()), 400, "twice"),
        ("unknown output", request(two, "POST", url, json.dumps({"inputs": good, "outputs": [{"name": "logits"}]}).encode()), 400, "unknown output 'logits'"),
        ("shared memory", request(two, "POST", url, json.dumps({"inputs": [dict(good[0], parameters={"shared_memory_region": "r"}), good[1]]}).encode()), 400, "shared-memory"),
        ("truncated binary data", binary([xb, idsb], x.tobytes() + ids.tobytes()[:-8]), 400, "truncated binary data"),
        ("binary_data_size wrong", binary([dict(xb, parameters={"binary_data_size": x.nbytes - 4}), idsb], x.tobytes()[:-4] + ids.tobytes()), 400, "needs 128"),
        ("bytes after the data", binary([xb, idsb], x.tobytes() + ids.tobytes() + b"junk"), 400, "4 bytes after"),
        ("header length beyond the body", binary([xb, idsb], b"", hlen_delta=10**6), 400, "Inference-Header-Content-Length"),
        ("data and binary", binary([dict(xb, data=x.ravel().tolist()), idsb], x.tobytes() + ids.tobytes()), 400, "not both"),
        ("gzip", request(two, "POST", url, b"\x1f\x8b", {"Content-Encoding": "gzip"}), 415, "Content-Encoding"),
    ]
    for what, (status, _, body), want_status, words in cases:
        err = json.loads(body)["error"]
        assert status == want_status and words in err, (what, status, err)
    # Sizes are refused from the headers, before a byte of the body is sent or allocated.
    big = f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**10}\r\n".encode()
    status, body = _raw_exchange(two, big + f"Inference-Header-Content-Length: 100\r\n\r\n".encode())
    assert status == 413 and "server.max_message_bytes" in body["error"], body
    status, body = _raw_exchange(two, big + b"\r\n")
    assert status == 413 and "binary tensor data extension" in body["error"], body
    status, body = _raw_exchange(two, f"POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode(), b"0\r\n\r\n")
    assert status == 411, body
    stays_up(two)


@pytest.mark.slow
def test_gateway_without_daemon_is_not_live_and_answers_503(tmp_path):
    gw = Gateway(tmp_path / "gw", f"ipc://{tmp_path}/nobody.sock", "m")
    try:
        assert request(gw, "GET", "/v2/health/live")[0] == 400
        assert request(gw, "GET", "/v2/health/ready")[0] == 400
        status, body = post_json(gw, {"inputs": [json_input("x", "FP32", np.zeros((1, 4), np.float32))]}, model="m")
        assert status == 503 and body["error"].startswith("UNAVAILABLE:"), body
        gc = tgrpc.InferenceServerClient(gw.grpc)
        assert not gc.is_server_live() and not gc.is_server_ready()
        raises(lambda: gc.get_model_metadata("m"), "StatusCode.UNAVAILABLE")
        gc.close()
    finally:
        assert gw.stop() == 0, gw.logs()


# ---- the slow daemon: TIMEOUT, OVERLOADED, DRAINING, UNAVAILABLE --------------------------------------------
def _dealer(endpoint):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _occupy(d: DaemonProc, sock) -> int:
    """One full batch running on the only worker and one waiting behind it (sent straight to packratd)."""
    from packratd import protocol as P
    x = np.zeros((SLOW_ROWS, 256, 256), np.float32)
    for rid in ("busy", "queued"):
        sock.send_multipart(P.request_frames(rid, [x]))
    deadline = time.monotonic() + 30
    while True:
        st = d.control()
        if st["inflight_batches"] >= 1 and st["queue_rows"] == SLOW_ROWS:
            return 2
        assert time.monotonic() < deadline, st
        time.sleep(0.005)


def _drain(sock, n: int) -> list[str]:
    out = []
    for _ in range(n):
        assert sock.poll(60_000), "no reply from packratd"
        out.append(json.loads(sock.recv_multipart()[0])["status"])
    return out


@pytest.mark.slow
def test_unavailable_until_serving(slow):
    d, gw, seen = slow
    if "infer" not in seen:
        pytest.skip("the gateway saw no moment between the daemon answering and it serving (a daemon that binds "
                    "its client socket only once it serves, or a start-up too fast to catch)")
    assert seen["ready"] == 400
    status, body = seen["infer"]
    assert status == 503 and body["error"].startswith("UNAVAILABLE:"), body


@pytest.mark.slow
def test_timeout_and_overloaded(slow):
    d, gw, _ = slow
    sock = _dealer(d.endpoint)
    hc = thttp.InferenceServerClient(gw.http)
    gc = tgrpc.InferenceServerClient(gw.grpc)
    try:
        n = _occupy(d, sock)
        for mod, c in ((thttp, hc), (tgrpc, gc)):
            one = mod.InferInput("x", [1, 256, 256], "FP32")
            one.set_data_from_numpy(np.zeros((1, 256, 256), np.float32))
            # A deadline (Triton's timeout parameter, microseconds) that passes while it waits in the queue.
            raises(lambda: c.infer("slow_mlp", [one], timeout=1000), "504" if mod is thttp else "StatusCode.DEADLINE_EXCEEDED",
                   "TIMEOUT")
            nine = mod.InferInput("x", [9, 256, 256], "FP32")
            nine.set_data_from_numpy(np.zeros((9, 256, 256), np.float32))
            # 32 rows queued + 9 > server.max_queue_rows (40)
            raises(lambda: c.infer("slow_mlp", [nine]), "503" if mod is thttp else "StatusCode.UNAVAILABLE", "OVERLOADED")
        assert _drain(sock, n) == ["ok", "ok"]
    finally:
        sock.close()
        hc.close()
        gc.close()


@pytest.mark.slow
def test_gateway_sheds_load_beyond_max_inflight(slow, tmp_path):
    d, _, _ = slow
    gw = Gateway(tmp_path / "gw", d.endpoint, "slow_mlp", extra=["--max-inflight", "1"])
    sock = _dealer(d.endpoint)
    held = {}
    try:
        n = _occupy(d, sock)
        one = {"inputs": [json_input("x", "FP32", np.zeros((1, 256, 256), np.float32))]}
        t = threading.Thread(target=lambda: held.update(r=post_json(gw, one, model="slow_mlp")))
        t.start()
        deadline = time.monotonic() + 30

        def held_in_packratd():
            # the gateway's 1-row request waits in packratd's queue: behind both batches, or behind the
            # second once the first finished (on a loaded host the first can finish before it arrives)
            st = d.control()
            q = st["queue_rows"]
            return q == SLOW_ROWS + 1 or (q == 1 and st["inflight_batches"] >= 1)
        while not held_in_packratd():
            assert time.monotonic() < deadline and t.is_alive(), d.control()
            time.sleep(0.005)
        status, body = post_json(gw, one, model="slow_mlp")
        assert status == 503 and "gateway already holds 1" in body["error"], body
        t.join(60)
        assert held["r"][0] == 200, held
        assert _drain(sock, n) == ["ok", "ok"]
    finally:
        sock.close()
        assert gw.stop() == 0, gw.logs()


@pytest.mark.slow
def test_draining_then_daemon_gone(slow):
    """Last test of the slow daemon: SIGTERM while requests wait, then the daemon exits."""
    d, gw, _ = slow
    sock = _dealer(d.endpoint)
    try:
        n = _occupy(d, sock)
        d.proc.send_signal(signal.SIGTERM)
        x = np.zeros((1, 256, 256), np.float32)
        status, body = post_json(gw, {"inputs": [json_input("x", "FP32", x)]}, model="slow_mlp")
        assert status == 503 and body["error"].startswith("DRAINING:"), body
        gc = tgrpc.InferenceServerClient(gw.grpc)
        one = tgrpc.InferInput("x", [1, 256, 256], "FP32")
        one.set_data_from_numpy(x)
        raises(lambda: gc.infer("slow_mlp", [one]), "StatusCode.UNAVAILABLE", "DRAINING")
        assert _drain(sock, n) == ["ok", "ok"]            # what was queued is still answered
        assert d.stop() == 0
        assert not gc.is_server_live()
        raises(lambda: gc.infer("slow_mlp", [one]), "StatusCode.UNAVAILABLE", "UNAVAILABLE")
        gc.close()
        assert request(gw, "GET", "/v2/health/live")[0] == 400
        assert gw.proc.poll() is None                     # the gateway outlives the daemon it fronts
    finally:
        sock.close()


@pytest.mark.slow
def test_gateway_stops_when_the_daemon_that_started_it_is_gone(tmp_path):
    """--parent-pid (what gateway_argv passes): a gateway orphaned by a SIGKILLed daemon does not linger."""
    import psutil
    ports = tmp_path / "ports.json"
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-m', 'packratd.oip', '--daemon', 'ipc://" + str(tmp_path) + "/x.sock',"
         " '--http', '127.0.0.1:0', '--ports-file', '" + str(ports) + "', '--parent-pid', str(os.getpid())])\n"
         "print(p.pid, flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    gw = psutil.Process(int(parent.stdout.readline()))
    try:
        deadline = time.monotonic() + 60
        while not ports.exists():
            assert time.monotonic() < deadline and gw.is_running()
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while gw.is_running() and gw.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphaned gateway is still running"
            time.sleep(0.1)
    finally:
        if gw.is_running():
            gw.kill()


# ---- TLS, config, proto -------------------------------------------------------------------------------------
def _self_signed(tmp) -> tuple[str, str]:
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_on_both_listeners(two, tmp_path):
    import ssl
    cert, key = _self_signed(tmp_path)
    ep = two.proc.args[two.proc.args.index("--daemon") + 1]
    gw = Gateway(tmp_path / "gw", ep, TWO, extra=["--tls-cert", cert, "--tls-key", key])
    try:
        x, ids = two_inputs(1)
        hc = thttp.InferenceServerClient(gw.http, ssl=True,
                                         ssl_context_factory=lambda: ssl.create_default_context(cafile=cert))
        assert hc.is_server_ready()
        ins = [thttp.InferInput("x", [1, 16], "FP32"), thttp.InferInput("ids", [1, 8], "INT64")]
        ins[0].set_data_from_numpy(x)
        ins[1].set_data_from_numpy(ids)
        assert hc.infer(TWO, ins).as_numpy("output_0").shape == (1, 4)
        hc.close()
        gc = tgrpc.InferenceServerClient(gw.grpc, ssl=True, root_certificates=cert)
        assert gc.is_server_ready()
        gc.close()
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            request(gw, "GET", "/v2/health/live")              # plain HTTP to the TLS port gets no answer
    finally:
        assert gw.stop() == 0, gw.logs()


def test_gateway_argv_from_config(tmp_path):
    from packratd import config
    from packratd.oip import gateway_argv, parse_listen
    base = {"model.path": "/srv/m/resnet50.pt2", "server.runtime_dir": str(tmp_path)}
    assert gateway_argv(config.load(None, base)) is None                     # off by default
    argv = gateway_argv(config.load(None, dict(base, **{"oip.http_listen": "8000"})), parent_pid=42)
    assert argv[1:3] == ["-m", "packratd.oip"]
    flag = dict(zip(argv[3::2], argv[4::2]))
    assert flag["--daemon"] == f"ipc://{tmp_path}/packratd.sock" and flag["--model-name"] == "resnet50"
    assert flag["--http"] == "8000" and "--grpc" not in flag and flag["--parent-pid"] == "42"
    assert parse_listen("8000") == ("127.0.0.1", 8000) and parse_listen("[::1]:9") == ("::1", 9)
    cfg = config.load(None, dict(base, **{"oip.grpc_listen": "0.0.0.0:8001", "oip.model_name": "rn",
                                          "server.listen": "tcp://10.0.0.1:5555"}))
    flag = dict(zip(gateway_argv(cfg)[3::2], gateway_argv(cfg)[4::2]))
    assert flag["--daemon"] == f"ipc://{tmp_path}/oip-gateway.sock" and flag["--model-name"] == "rn"
    with pytest.raises(ValueError, match="tls_key"):
        gateway_argv(config.load(None, dict(base, **{"oip.http_listen": "8000", "oip.tls_cert": "/c.pem"})))
    for bad in (":8000", "host", "1.2.3.4:99999", "[::1]8000"):
        with pytest.raises(config.ConfigError, match="oip.http_listen"):
            config.load(None, dict(base, **{"oip.http_listen": bad}))


def test_proto_is_wire_compatible_with_tritonclient():
    """Every message and field the gateway declares has the same number and type in tritonclient's copy of the
    service (Triton's grpc_service.proto), and the compiled descriptor is that of the committed .proto."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2
    from packratd.oip import _descriptor, proto
    with open(os.path.join(ROOT, "packratd", "oip", "grpc_predict_v2.proto"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == _descriptor.PROTO_SHA256, "run python -m packratd.oip.gen_proto"
    fd = descriptor_pb2.FileDescriptorProto.FromString(_descriptor.FILE_DESCRIPTOR)
    assert fd.package == "inference" and [s.name for s in fd.service] == ["GRPCInferenceService"]
    theirs_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in fd.service[0].method:
        t = theirs_service.methods_by_name[m.name]
        assert (m.input_type, m.output_type) == ("." + t.input_type.full_name, "." + t.output_type.full_name)

    def repeated(f):     # FieldDescriptor.label is deprecated in newer protobuf, is_repeated absent in older
        return f.is_repeated if hasattr(type(f), "is_repeated") else f.label == f.LABEL_REPEATED

    def walk(ours, theirs):
        for f in ours.fields:
            t = theirs.fields_by_name[f.name]
            assert (f.number, f.type, repeated(f)) == (t.number, t.type, repeated(t)), f.full_name
            if f.message_type is not None:
                walk(f.message_type, t.message_type)
    for name in proto.METHODS:
        for suffix in ("Request", "Response"):
            walk(proto.descriptor(name + suffix), service_pb2.DESCRIPTOR.message_types_by_name[name + suffix])


# ---- the gateway as the daemon runs it --------------------------------------------------------------
def _ports(d, old_pid=None, old_mtime=0, timeout=60):
    """The daemon's gateway: (status, ports, mtime of its ports file) once a gateway other than old_pid
    listens (it writes <runtime_dir>/oip-ports.json when it is)."""
    path = os.path.join(d.runtime_dir, "oip-ports.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gw = d.control()["gateway"]
        if gw["pid"] and gw["pid"] != old_pid and os.path.exists(path) and os.stat(path).st_mtime_ns > old_mtime:
            ports = json.loads(open(path).read())
            try:
                if requests_status(f"http://127.0.0.1:{ports['http']}/v2/health/ready") == 200:
                    return gw, ports, os.stat(path).st_mtime_ns
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not listening: {d.control()['gateway']}\n{d.logs()[-2000:]}")


def requests_status(url: str) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
@pytest.mark.parametrize("listen", ["ipc", "tcp"])
def test_the_daemon_starts_supervises_and_stops_its_gateway(daemon, tiny_model, tmp_path, listen):
    """oip.* in the config: the daemon starts the gateway, restarts it when it dies, and stops it with
    itself.  With a tcp:// (CURVE) server.listen the gateway reaches the dispatcher over an owner-only
    ipc socket of its own (oip-gateway.sock), not over TCP."""
    extra = ["--set", "oip.http_listen=127.0.0.1:0", "--set", "oip.grpc_listen=127.0.0.1:0"]
    if listen == "tcp":
        import socket as so
        with so.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        clients = tmp_path / "curve-clients"
        clients.mkdir()
        extra += ["--listen", f"tcp://127.0.0.1:{port}", "--set", f"server.curve_clients_dir={clients}"]
    d = daemon(tiny_model, plan="1x1:8", extra=extra)
    gw, ports, mtime = _ports(d)
    if listen == "tcp":
        st = os.stat(os.path.join(d.runtime_dir, "oip-gateway.sock"))
        assert oct(st.st_mode & 0o777) == "0o600"
    x = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)
    (want,) = reference(load_module(tiny_model), x)

    def infer_both(ports):
        for mod, url in ((thttp, f"127.0.0.1:{ports['http']}"), (tgrpc, f"127.0.0.1:{ports['grpc']}")):
            c = mod.InferenceServerClient(url)
            inp = mod.InferInput("x", [3, 64], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_allclose(c.infer("tiny_mlp", [inp]).as_numpy("output_0"), want, rtol=RTOL, atol=ATOL)
            c.close()
    infer_both(ports)
    os.kill(gw["pid"], signal.SIGKILL)                       # the gateway dies: the daemon starts another
    gw2, ports2, _ = _ports(d, old_pid=gw["pid"], old_mtime=mtime)
    assert gw2["restarts"] == 1 and gw2["pid"] != gw["pid"]
    infer_both(ports2)
    assert d.control()["errors"] == {}
    assert d.stop() == 0
    assert not psutil.pid_exists(gw2["pid"]) or psutil.Process(gw2["pid"]).status() == psutil.STATUS_ZOMBIE
