# The two commands of the README. Each sets up .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmm_ray-installed

.PHONY: sweep test install clean
sweep: $(STAMP)  ## the main job: a sweep on the embedded default, ending in a Pareto table and an MLflow experiment
	$(VENV)/bin/lmm-ray sweep sweeps/quickstart.yaml

test: $(STAMP)  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
