"""Every packratd setting: one name, one default, one check, in one place.

The shipped ``etc/packratd/packratd.toml`` is generated from :data:`OPTIONS`
(``packratd --dump-config``), and a test keeps the two identical, so the file
always lists every option, commented, with its default.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file, key and reason."""


@dataclass(frozen=True)
class Option:
    key: str                 # "section.name"
    type: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None   # returns a reason when the value is bad

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _one_of(*choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def _endpoint(v):
    if not v.startswith(("ipc://", "tcp://")):
        return "must start with ipc:// or tcp://"
    return None


def _port(v):
    return None if 0 <= v <= 65535 else "must be a TCP port, 0-65535 (0: disabled)"


def _plan(v):
    if not v:
        return None
    from .placement import parse_plan
    try:
        parse_plan(v)
    except ValueError as e:
        return str(e)
    return None


OPTIONS: tuple[Option, ...] = (
    Option("model.path", str, "", "The model to serve: a torch.export archive (.pt2) whose inputs have a dynamic batch dimension 0."),
    Option("server.listen", str, "ipc://{runtime_dir}/packratd.sock",
           "Where clients connect (ZeroMQ endpoint). {runtime_dir} expands to server.runtime_dir.", _endpoint),
    Option("server.runtime_dir", str, "/run/packratd", "Directory for the ipc sockets (the worker socket lives here too)."),
    Option("server.state_dir", str, "/var/lib/packratd", "Directory for persistent state (profile cache)."),
    Option("server.max_batch_size", int, 32, "Largest batch the dispatcher forms; a single request with more rows is refused (TOO_LARGE).", _positive),
    Option("server.max_delay_ms", float, 0.0,
           "0: work-conserving batching (a request is dispatched at once when the instances are idle; batches form from "
           "what queues while they are busy). > 0: the oldest queued request may wait this long for others to join its "
           "batch while the instances are idle (more throughput, more latency).", _non_negative),
    Option("server.max_queue_rows", int, 4096, "Rows that may wait in the queue; beyond it requests get OVERLOADED at once.", _positive),
    Option("server.max_queue_bytes", int, 1 << 30,
           "Bytes of request tensors that may wait in the queue; beyond it requests get OVERLOADED at once.", _positive),
    Option("server.max_requests_per_client", int, 256,
           "Requests one client connection may have queued or running; beyond it that connection gets OVERLOADED.", _positive),
    Option("server.client_hwm", int, 64,
           "Messages ZeroMQ queues per client connection, each way (send and receive high-water marks): a client that "
           "never reads loses replies beyond it, one that floods is slowed by back-pressure.", _positive),
    Option("server.max_message_bytes", int, 1 << 28,
           "Largest client message: a frame above it is dropped by ZeroMQ before it is allocated (ZMQ_MAXMSGSIZE); frames adding up to more get TOO_LARGE.", _positive),
    Option("server.socket_group", str, "",
           "Group (name or numeric gid) whose members may use the client socket: server.runtime_dir is made 0750 (they "
           "may reach the sockets but not create, remove or replace them) and packratd.sock 0660, owned by this group. "
           "Empty: only packratd's own user (and root)."),
    Option("server.admin_group", str, "",
           "Group whose members are operators: control.sock (packratctl) is 0660 for this group. Empty: control.sock is "
           "0600, so only packratd's own user and root can run packratctl. Clients (server.socket_group) are never "
           "operators unless they are in this group too."),
    Option("server.curve", bool, True,
           "With a tcp:// server.listen, require CURVE (encryption and client keys). TCP is off by default (server.listen is "
           "ipc://) and binds only the address given; false allows plain TCP: anyone who reaches the port can use the model."),
    Option("server.curve_keys_dir", str, "",
           "Where the server's CURVE keypair is kept (made on first start; clients need server.key). Empty: <state_dir>/curve."),
    Option("server.curve_clients_dir", str, "/etc/packratd/curve-clients",
           "Public keys (*.key) of the clients allowed over tcp://; any other key fails the handshake. Re-read on reload."),
    Option("workers.plan", str, "",
           'Instances to run, e.g. "2x1:4" (2 instances of 1 thread, batch share 4 each) or "2:8,1:4". Empty: packratd chooses.', _plan),
    Option("workers.use_smt", bool, False, "Use SMT siblings as extra threads (default: one thread per physical core)."),
    Option("workers.runtime", str, "auto",
           "What runs the model in each worker: auto (measure the available runtimes and pick the fastest), eager, "
           "inductor, openvino, onnxruntime. A runtime that cannot take the model is skipped (status says why); "
           "one given here that cannot falls back to eager.", _one_of("auto", "eager", "inductor", "openvino", "onnxruntime")),
    Option("workers.runtime_specials", str, "strict",
           "strict: a runtime is used only if NaN and Inf in the inputs come out where eager puts them (OpenVINO and "
           "frozen inductor turn Relu(NaN) into 0); ignore: accept it anyway (faster on ReLU networks).",
           _one_of("strict", "ignore")),
    Option("workers.fork_server", bool, True,
           "Start workers by forking a process that has imported torch and loaded the model once (boot in a fraction "
           "of a second instead of seconds); false: each worker is a new interpreter. The first generation after a "
           "start is spawned while the fork server loads."),
    Option("workers.allocator", str, "glibc-tuned",
           "Memory allocator for workers: glibc, glibc-tuned (no mmap churn for large tensors), jemalloc, tcmalloc.",
           _one_of("glibc", "glibc-tuned", "jemalloc", "tcmalloc")),
    Option("workers.pin_threads", bool, True, "Pin each OpenMP thread of an instance to its own core (OMP_PLACES/OMP_PROC_BIND)."),
    Option("workers.warmup_batches", int, 1,
           "Batches each worker runs at each of its warm-up sizes (its share, and its slices of the batch sizes seen) "
           "before it reports READY; the first call at a size builds the kernels, later ones add little.", _non_negative),
    Option("workers.warmup_nice", int, 10,
           "Nice value a worker warms up at, back to 0 once READY (so a new generation's warm-up yields to the one "
           "serving on the same cores: ResNet-50 on 2 cores, p99 during a switch 1.9x steady at 0, 1.55x at 10, 1.2x at "
           "19, green READY after 1.0, 1.7 and 5.2 s); needs root or LimitNICE=+0 (the unit has it) to come back, "
           "else it is not used. 0: off.", lambda v: None if 0 <= v <= 19 else "must be 0..19"),
    Option("workers.heartbeat_interval_s", float, 1.0, "Heartbeat period between dispatcher and workers, both ways.", _positive),
    Option("workers.heartbeat_liveness", int, 5, "Missed heartbeats after which a peer is considered dead.", _positive),
    Option("workers.boot_timeout_s", float, 300.0, "Time a worker may take to load and warm up before it is declared failed.", _positive),
    Option("workers.stop_grace_s", float, 10.0, "Time a worker gets after SIGTERM before SIGKILL.", _non_negative),
    Option("workers.max_restarts", int, 5, "Consecutive failed restarts of one instance before it is declared failed.", _non_negative),
    Option("autotune.batch_size", int, 0,
           "Batch size the plan is chosen for when workers.plan is empty; 0 means server.max_batch_size.", _non_negative),
    Option("autotune.candidates", int, 3, "How many of the solver's best plans are measured running concurrently before one is chosen.", _positive),
    Option("autotune.split_margin", float, 0.05,
           "Several instances replace the single fat instance only when predicted (or measured) at least this much faster.",
           _non_negative),
    Option("autotune.interference_check", bool, True,
           "Measure the candidate plans concurrently (co-location interference) and keep the measured best."),
    Option("autotune.prepare_timeout_s", float, 1800.0,
           "Longest one runtime may take to compile or convert the model (once per model and host; cached in "
           "<state_dir>/runtimes); past it that runtime is skipped.", _positive),
    Option("autotune.solver_timeout_s", float, 30.0,
           "Longest a plan computation (solver, monitor scoring) may take in the planner process before it is stopped "
           "and reported as an error; the main loop never waits on it.", _positive),
    Option("profile.max_threads", int, 0, "Largest thread count profiled for one instance; 0 means the cores of the largest NUMA node.", _non_negative),
    Option("profile.min_reps", int, 3, "Timed runs per profile point at least.", _positive),
    Option("profile.max_reps", int, 15, "Timed runs per profile point at most.", _positive),
    Option("profile.rel_spread", float, 0.05, "A point is stable when its interquartile range is within this fraction of its median.", _positive),
    Option("profile.point_budget_s", float, 2.0, "Once min_reps are done, stop repeating a point after this many seconds.", _positive),
    Option("monitor.enabled", bool, True,
           "Watch the batch sizes formed and reconfigure when another instance shape is predicted better (only without workers.plan)."),
    Option("monitor.interval_s", float, 2.0, "How often the monitor evaluates the window.", _positive),
    Option("monitor.window_s", float, 60.0, "Sliding window of batches considered, by time.", _positive),
    Option("monitor.window_batches", int, 1000, "Sliding window of batches considered, by count.", _positive),
    Option("monitor.min_batches", int, 50, "Batches the window must hold before the monitor decides anything.", _positive),
    Option("monitor.min_dwell_s", float, 30.0, "Least time between two reconfigurations.", _non_negative),
    Option("monitor.min_improvement", float, 0.10,
           "A new shape must be predicted at least this fraction better than the current one.", _non_negative),
    Option("monitor.confirmations", int, 2, "Consecutive evaluations the same better shape must win before switching.", _positive),
    Option("monitor.objective", str, "mean", "What the monitor minimises over the window: mean, p50, p90 or p99 batch latency.",
           _one_of("mean", "p50", "p90", "p99")),
    Option("monitor.min_gain_ms", float, 0.2,
           "A new shape must save at least this many ms per batch, and more than the measured run-to-run noise of batch "
           "latency (interquartile range at the most common batch size).", _non_negative),
    Option("monitor.payback_s", float, 300.0,
           "A switch must pay for itself within this many seconds: its measured cost (switch time x slowdown while green "
           "boots on shared cores) against the predicted gain per second at the observed request rate.", _positive),
    Option("oip.http_listen", str, "",
           "Open Inference Protocol (KServe v2) REST listener of the gateway: ADDR:PORT, [IPv6]:PORT, or a bare PORT "
           "(= 127.0.0.1:PORT). Empty: off. No authentication: beyond loopback use TLS (oip.tls_*) or a proxy in front.",
           lambda v: __import__("packratd.oip").oip.listen_problem(v)),
    Option("oip.grpc_listen", str, "",
           "OIP gRPC listener (inference.GRPCInferenceService), same forms as oip.http_listen. Empty: off.",
           lambda v: __import__("packratd.oip").oip.listen_problem(v)),
    Option("oip.model_name", str, "", "The model's name for OIP clients (/v2/models/NAME). Empty: the model file's name without .pt2."),
    Option("oip.tls_cert", str, "",
           "PEM certificate chain for both OIP listeners; with oip.tls_key they speak TLS only. Empty: plain "
           "(a warning is logged for a plain listener beyond loopback)."),
    Option("oip.tls_key", str, "", "PEM private key of oip.tls_cert (keep it 0600)."),
    Option("oip.tls_client_ca", str, "",
           "PEM CA bundle: OIP clients must present a certificate it signed (mutual TLS). Empty: any client."),
    Option("oip.max_inflight", int, 64,
           "Requests the gateway holds at once (request bodies being read count); more get 503 / UNAVAILABLE at once. "
           "Gateway memory is bounded by about this times server.max_message_bytes.", _positive),
    Option("oip.request_timeout_s", float, 60.0,
           "How long the gateway waits for packratd's answer to one request before it answers 503 / UNAVAILABLE.", _positive),
    Option("metrics.port", int, 0, "Port of the Prometheus metrics HTTP server (/metrics); 0 disables it.", _port),
    Option("metrics.address", str, "127.0.0.1", "Address the metrics HTTP server binds; 0.0.0.0 or :: for every interface."),
    Option("log.level", str, "info", "Log level: debug, info, warning, error.", _one_of("debug", "info", "warning", "error")),
)

_BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    values: dict
    source: str = "<defaults>"

    def __getitem__(self, key: str):
        return self.values[key]

    def get(self, key: str):
        return self.values[key]

    @property
    def listen(self) -> str:
        return self.values["server.listen"].replace("{runtime_dir}", self.values["server.runtime_dir"])

    @property
    def worker_endpoint(self) -> str:
        return "ipc://" + os.path.join(self.values["server.runtime_dir"], "workers.sock")

    def replace(self, **kv) -> "Config":
        vals = dict(self.values)
        for k, v in kv.items():
            vals[k.replace("__", ".")] = v
        return dataclasses.replace(self, values=vals)


def _coerce(opt: Option, value: Any, where: str) -> Any:
    t = opt.type
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t is bool and not isinstance(value, bool) or (t is not bool and isinstance(value, bool)) or not isinstance(value, t):
        raise ConfigError(f"{where}: {opt.key}: expected {t.__name__}, got {type(value).__name__} {value!r}")
    if opt.check is not None:
        reason = opt.check(value)
        if reason:
            raise ConfigError(f"{where}: {opt.key} = {value!r}: {reason}")
    return value


def _parse_override_value(opt: Option, text: str):
    if opt.type is str:
        return text
    if opt.type is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"command line: {opt.key}: expected true/false, got {text!r}")
    try:
        return opt.type(text)
    except ValueError:
        raise ConfigError(f"command line: {opt.key}: expected {opt.type.__name__}, got {text!r}") from None


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config (None: defaults only), apply overrides {"section.name": value}.

    Unknown sections or keys and bad values raise ConfigError naming the file, key and reason.
    Override values may be strings (from the command line); they are parsed by the option's type.
    """
    values = {o.key: o.default for o in OPTIONS}
    source = "<defaults>"
    if path:
        source = path
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except PermissionError:
            raise ConfigError(f"{path}: permission denied") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section}: expected a [section] table, got a value")
            for name, value in table.items():
                key = f"{section}.{name}"
                opt = _BY_KEY.get(key)
                if opt is None:
                    known = ", ".join(o.name for o in OPTIONS if o.section == section)
                    hint = f" (known in [{section}]: {known})" if known else f" (known sections: {', '.join(sorted({o.section for o in OPTIONS}))})"
                    raise ConfigError(f"{path}: unknown key {key}{hint}")
                values[key] = _coerce(opt, value, path)
    for key, value in (overrides or {}).items():
        opt = _BY_KEY.get(key)
        if opt is None:
            raise ConfigError(f"command line: unknown key {key}")
        if isinstance(value, str) and opt.type is not str:
            value = _parse_override_value(opt, value)
        values[key] = _coerce(opt, value, "command line")
    if not values["model.path"]:
        raise ConfigError(f"{source}: model.path is not set (give it in the config or with --model)")
    return Config(values=values, source=source)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def dump_defaults() -> str:
    """The shipped config file: every option, commented out, with its default and what it does."""
    lines = [
        "# packratd configuration.",
        "# Every option is listed with its default; uncomment to change it.",
        "# Generated by `packratd --dump-config`; a test keeps this file and the code in step.",
    ]
    section = None
    for o in OPTIONS:
        if o.section != section:
            section = o.section
            lines += ["", f"[{section}]"]
        lines.append(f"# {o.doc}")
        lines.append(f"#{o.name} = {_toml_value(o.default)}")
    return "\n".join(lines) + "\n"
