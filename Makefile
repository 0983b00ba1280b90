# The two commands a new user runs (README): `make demo` and `make test`.
# Every target below creates .venv when it is missing and installs the package into it.
# Developers: `make test-fast` (skips the slow end-to-end runs), `make lint` (what CI checks),
# `make format` (rewrites files: ruff's safe fixes, then the formatter).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quickstart

.PHONY: demo frontier test test-fast lint format install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned to the CPU build that is on this machine's local wheels (no CUDA download).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/rlhf-lightning pipeline -c configs/quickstart.yaml --run_dir $(RUN_DIR)

# The reward-KL frontier of the demo task (configs/frontier.yaml): PPO, DPO and GRPO over their KL
# settings x 3 seeds, best-of-n, Gao et al.'s fits; ends with runs/frontier/frontier.md.
frontier: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/rlhf-lightning sweep -c configs/frontier.yaml --run_dir runs/frontier

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q --durations=15 -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Fixes first (a removed import or re-sorted block may need reformatting), then the formatter.
# --exit-zero: findings without a safe fix are printed but do not stop the formatter; `make lint` fails on them.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix --exit-zero .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs
