# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make-installed
DEMO := out/demo

.PHONY: install slurm-packages lint test test-fast demo bench bench-eval fixtures clean

# torch is pinned first: on a CPU machine it resolves to a local CPU build, where an unpinned
# `torch` (pulled in by transformers) would download several GB of CUDA wheels.
install: $(STAMP)
$(STAMP): pyproject.toml
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Slurm's daemons, for the tests that run a real single-node cluster (tests/slurmcluster.py): Debian's
# packages, installed as root where apt-get is; elsewhere those tests are skipped, saying why.
SLURM_PACKAGES := slurmctld slurmd munge slurmdbd mariadb-server
slurm-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	   ! { command -v slurmctld && command -v slurmdbd && command -v mariadbd; } >/dev/null; then \
	  echo "installing $(SLURM_PACKAGES) for the Slurm tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null 2>&1; } || \
	  echo "could not install $(SLURM_PACKAGES): the Slurm tests will be skipped"; \
	fi

# Style and the layering (pyproject.toml's import-linter contracts); part of `make test`.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

test: lint slurm-packages
	$(PYTHON) -m pytest -q

# The inner loop: everything but the tests marked slow (about 30 s).
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

# Trains two small trajectories once (about 5 minutes on 2 cores), then averages, scores, plots and
# computes savings with the ckptavg CLI; the figures go to out/demo/figures/ (docs/ holds the recorded run's).
demo: install
	HF_DATASETS_OFFLINE=1 $(PYTHON) examples/tiny_pythia/demo.py --out $(DEMO)

# The trainer fixtures in tests/trainers/data/ (committed): tiny runs that OLMo-core, Lightning, transformers,
# DeepSpeed, megatron-core, torchtitan and nanoGPT really wrote. Needs those trainers, which the tests do not: a
# virtual environment that sees this one's torch (see tests/trainers/write.py), and a nanoGPT clone.
TRAINERS_PYTHON ?= .trainers/bin/python
NANOGPT ?=
fixtures: install
	@test -x $(TRAINERS_PYTHON) || { $(PYTHON) -m venv --system-site-packages .trainers && \
	  echo "torch==2.13.0" > .trainers/constraints.txt && \
	  .trainers/bin/pip install -q -c .trainers/constraints.txt ai2-olmo-core==3.0.0 pytorch-lightning==2.6.6 \
	    megatron-core==0.16.1 torchtitan==0.3.0 triton && \
	  .trainers/bin/pip install -q -c .trainers/constraints.txt --no-build-isolation deepspeed==0.19.8; }
	$(TRAINERS_PYTHON) tests/trainers/write.py --out tests/trainers/data $(if $(NANOGPT),--nanogpt $(NANOGPT))

bench: install
	$(PYTHON) bench/average.py

bench-eval: install
	$(PYTHON) bench/eval.py

clean:
	rm -rf out $(STAMP)
