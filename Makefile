# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make-installed
DEMO := out/demo

.PHONY: install test demo bench clean

# torch is pinned first: on a CPU machine it resolves to a local CPU build, where an unpinned
# `torch` (pulled in by transformers) would download several GB of CUDA wheels.
install: $(STAMP)
$(STAMP): pyproject.toml
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) examples/tiny_trajectory.py --out $(DEMO)/tiny-pythia
	$(PYTHON) -m ckptavg trajectory $(DEMO)/tiny-pythia --k 5 --nu 100 --interval 100 --start 500 \
		--end 1000 --out $(DEMO)/averaged --quiet
	$(PYTHON) examples/compare_loss.py $(DEMO)/tiny-pythia $(DEMO)/averaged/tiny-pythia/lawa-k5-nu100

bench: install
	$(PYTHON) bench/average.py

clean:
	rm -rf out $(STAMP)
