# The two commands of the README. Each sets up .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmm_ray-installed

.PHONY: sweep test install clean base base-ship
# Run again, it resumes the quickstart (an interrupted one continues, a finished one reprints its
# results); `make sweep ARGS="name=another"` starts a new sweep.
sweep: $(STAMP)  ## the main job: a sweep on the embedded default, ending in a Pareto table and an MLflow experiment
	$(VENV)/bin/lmm-ray sweep sweeps/quickstart.yaml $(if $(and $(wildcard runs/quickstart/tune/tuner.pkl),$(if $(ARGS),,1)),--resume) $(ARGS)

# One process: with 3 (pytest-xdist, `-n 3 --dist loadfile`) each process started its own shared Ray
# beside the sweeps' own, and on 2 cores Ray's fixed 30 s start-up waits were missed (docs/benchmarks.md).
test: $(STAMP)  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

install: $(STAMP)

# The quickstart's base ships in lmm_ray/bases (a sweep uses it instead of ~10-20 min of pre-training).
base: $(STAMP)  ## rebuild the shipped base in a temporary folder and compare it, file by file (sha256), with the shipped copy
	$(VENV)/bin/lmm-ray base build --preset quickstart --verify

base-ship: $(STAMP)  ## after a change to the generators, tokenizer or preset: rebuild the base and ship it
	$(VENV)/bin/lmm-ray base build --preset quickstart --ship

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
