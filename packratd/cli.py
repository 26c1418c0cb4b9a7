"""The ``packratd`` command: parse the command line, load the config, set up logging, run the daemon."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, config as config_mod


def setup_logging(level: str) -> None:
    handler = None
    if os.environ.get("JOURNAL_STREAM") and os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="packratd")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s packratd[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="packratd", description="Serve a PyTorch model on CPU at the lowest latency the host allows.")
    p.add_argument("-c", "--config", help="TOML config file (default: none, built-in defaults)")
    p.add_argument("--model", help="override model.path")
    p.add_argument("--plan", help='override workers.plan, e.g. "2x1:4"')
    p.add_argument("--listen", help="override server.listen")
    p.add_argument("--runtime-dir", help="override server.runtime_dir")
    p.add_argument("--state-dir", help="override server.state_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any option, e.g. server.max_batch_size=64")
    p.add_argument("--dump-config", action="store_true", help="print the config file with every option and its default, and exit")
    p.add_argument("--version", action="version", version=f"packratd {__version__}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from .daemon import EXIT_CONFIG, Daemon
    args = parse_args(argv)
    if args.dump_config:
        sys.stdout.write(config_mod.dump_defaults())
        return 0
    overrides = {}
    for key, val in (("model.path", args.model), ("workers.plan", args.plan), ("server.listen", args.listen),
                     ("server.runtime_dir", args.runtime_dir), ("server.state_dir", args.state_dir)):
        if val is not None:
            overrides[key] = val
    for kv in args.set:
        if "=" not in kv:
            print(f"packratd: --set {kv!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        k, v = kv.split("=", 1)
        overrides[k.strip()] = v.strip()
    try:
        cfg = config_mod.load(args.config, overrides)
    except config_mod.ConfigError as e:
        print(f"packratd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg["log.level"])
    return Daemon(cfg, config_path=args.config, overrides=overrides).run()


if __name__ == "__main__":
    sys.exit(main())
