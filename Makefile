VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean slurm-packages

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmc demo

# the Debian packages of the real single-node Slurm the tests start (tests/slurm_cluster.py):
# installed as root when missing, a no-op when present; without root the Slurm tests skip
slurm-packages:
	@sh tests/install_slurm.sh

test: $(STAMP) slurm-packages
	$(PY) -m ruff check gpu streamer tests benchmarks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/k3_movie.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
