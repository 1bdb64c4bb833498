# The two commands of the README. Each sets up .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmm_ray-installed

.PHONY: sweep test install clean
# Run again, it resumes the quickstart (an interrupted one continues, a finished one reprints its
# results); `make sweep ARGS="name=another"` starts a new sweep.
sweep: $(STAMP)  ## the main job: a sweep on the embedded default, ending in a Pareto table and an MLflow experiment
	$(VENV)/bin/lmm-ray sweep sweeps/quickstart.yaml $(if $(and $(wildcard runs/quickstart/tune/tuner.pkl),$(if $(ARGS),,1)),--resume) $(ARGS)

# 3 processes, whole modules each (their sweeps and trainers run once); see tests/conftest.py.
test: $(STAMP)  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
