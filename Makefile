# packratd developer entry points.  `make run` and `make test` work on a fresh machine:
# they create .venv in the checkout and install what is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS := models
DEFAULT_MODEL := $(MODELS)/tiny_mlp.pt2
RUNTIME_DIR ?= $(CURDIR)/run
STATE_DIR ?= $(CURDIR)/state
PLAN ?=
METRICS_PORT ?= 9464
TEST_ARGS ?=

.PHONY: run test test-fast bench install deps models clean config install-service

$(STAMP): pyproject.toml
	@command -v pkg-config >/dev/null && pkg-config --exists libsystemd 2>/dev/null || \
	  { echo "installing libsystemd-dev and pkg-config (for systemd-python)"; \
	    (apt-get install -y -qq libsystemd-dev pkg-config >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq libsystemd-dev pkg-config >/dev/null)) || \
	    echo "warning: could not install libsystemd-dev; packratd will use its built-in sd_notify sender"; }
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test,bench,oip,onnxruntime,openvino]'
	-$(VPY) -m pip install -q --disable-pip-version-check 'systemd-python>=235'
	@touch $(STAMP)

install deps: $(STAMP)

$(DEFAULT_MODEL): | $(STAMP)
	@mkdir -p $(MODELS)
	$(VPY) tools/export_model.py tiny_mlp $@

models: $(STAMP)
	$(VPY) tools/export_model.py --all $(MODELS)

run: $(STAMP) $(DEFAULT_MODEL)
	@mkdir -p $(RUNTIME_DIR) $(STATE_DIR)
	@echo "packratd: metrics on http://127.0.0.1:$(METRICS_PORT)/metrics; status: .venv/bin/packratctl --runtime-dir run status"
	$(VENV)/bin/packratd --model $(DEFAULT_MODEL) --runtime-dir $(RUNTIME_DIR) --state-dir $(STATE_DIR) \
	  --set metrics.port=$(METRICS_PORT) $(if $(PLAN),--plan $(PLAN),)

test: $(STAMP)
	$(VPY) -m pytest -q $(TEST_ARGS)

# Pure logic only (solver, placement, topology, protocol, policy tables, the dispatcher on fake workers): seconds.
test-fast: $(STAMP)
	$(VPY) -m pytest -q -m fast $(TEST_ARGS)

# The full run takes about two hours on a 2-core VM; each tool takes --help (and --quick where it makes sense).
bench: $(STAMP)
	$(VPY) tools/bench_solver.py --out benchmarks/solver.json
	$(VPY) tools/bench_settings.py
	$(VPY) tools/bench_serving.py
	$(VPY) tools/bench_autotune.py
	$(VPY) tools/bench_runtimes.py --packratd
	$(VPY) tools/bench_overhead.py
	$(VPY) tools/bench_reconfig.py
	$(VPY) tools/bench_protocols.py --md

# sudo make install-service MODEL=/srv/models/m.pt2 [INSTALL_ARGS="--enable --start"]
install-service: $(STAMP)
	sh systemd/install.sh --bin $(CURDIR)/$(VENV)/bin/packratd $(if $(MODEL),--model $(abspath $(MODEL)),) $(INSTALL_ARGS)

config: $(STAMP)
	$(VENV)/bin/packratd --dump-config > etc/packratd/packratd.toml

clean:
	rm -rf $(RUNTIME_DIR) $(STATE_DIR) .pytest_cache
