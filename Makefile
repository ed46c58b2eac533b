# `make demo`: set up the runtime environment and segment the sample images (overlays + JSON in outputs/demo).
# `make test`: set up the runtime and the test-only oracle environments and run the test suite.
PYTHON ?= python3
VENV := .venv
ORACLE := .venv-oracle
# torch is pinned here only to take the build this machine holds locally; setup.cfg declares ranges.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast test-slow lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

$(ORACLE)/.installed: $(VENV)/.installed tests/oracles/setup_oracle_env.sh
	bash tests/oracles/setup_oracle_env.sh $(VENV) $(ORACLE)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m modelscope_plugin.apps.demo --output outputs/demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check modelscope_plugin benchmarks

test: $(VENV)/.installed $(ORACLE)/.installed lint
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

# the slow tests: full-size parity (Swin-L on a photo, EasyCV R50; most of the time), the demo models' 200-scene
# figures and the 48-step learning check (about 20 minutes on 2 idle cores); CI runs them after `make test`
test-slow: $(VENV)/.installed $(ORACLE)/.installed
	$(VENV)/bin/python -m pytest -q -m slow tests

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow and not oracle" tests

clean:
	rm -rf $(VENV) $(ORACLE) outputs
