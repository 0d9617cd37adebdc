# The two set-up commands of README.md: `make demo` and `make test`.
# Both create .venv and install the project with every CPU extra on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# A CPU-only machine: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs
# PyTorch's CPU wheels from PyTorch's own index first (the default wheels carry CUDA: a 6.4 GB
# venv); everything else then comes from PyPI as usual.
TORCH_INDEX ?=

.PHONY: install demo test test-isa lint mutate mutate-report clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) 'torch>=2.4' 'torchvision>=0.19')
	$(PY) -m pip install --quiet -e '.[train,export,qat,serve,ray,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pgd-train demo --work-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The trained-fixture tests (marker `trained`) once per CPU kernel path: native, ATen and oneDNN
# lowered to SSE4.1, to AVX2, and one thread (tests/_isa_matrix.py; README, Development). For
# contributors before a change to a trained fixture or a margin; CI runs `make test`.
#   make test-isa ISA_PATHS='sse41'   ISA_ARGS='-x -k qat'
ISA_PATHS ?=
ISA_ARGS ?=
test-isa: $(STAMP)
	$(PY) tests/_isa_matrix.py $(ISA_PATHS) -- $(ISA_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pgd_deploy tests bench

# Mutation testing (mutmut; [tool.mutmut] in pyproject.toml lists the modules and their test
# files). Incremental: results are kept in mutants/ (`make clean` starts over). One module at a
# time, e.g.
#   make mutate MUTANTS='pgd_deploy.schedule.*'
# `make mutate-report` prints the score table and the survivors (docs/mutation_survivors.md).
# PYTHONPATH is cleared: pointing it at the repository would import the unmutated package.
# One OpenMP thread: each mutant is forked from a fork server, and a forked child deadlocks in
# an OpenMP pool its parent started.
MUTANTS ?=
MUTMUT := env -u PYTHONPATH OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) tests/_mutate.py
mutate: $(STAMP)
	$(MUTMUT) run $(MUTANTS)
	$(MUTMUT) results
	$(MUTMUT) export-cicd-stats && cat mutants/mutmut-cicd-stats.json

mutate-report: $(STAMP)
	$(PY) tests/_mutation_report.py

clean:
	rm -rf runs .pytest_cache mutants
