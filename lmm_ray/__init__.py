"""lmm_ray: teach a large multimodal model a new skill without erasing what it knows.

Sweeps fine-tuning *recipes* (which parameters are unfrozen, the learning rate, ...) with
Ray Tune + Optuna, trains each trial through a sequence of skill stages on Ray Train, and
scores it on target-skill gain, held-out change and a counting-bias probe (MLflow logs all).
"""

import os as _os

# OpenMP threads that spin while waiting make torch many times slower when other processes share
# the cores (seen here: a tiny train step went from 0.05 s to 4.6 s). Must be set before torch loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
