"""lmm_ray: teach a large multimodal model a new skill without erasing what it knows.

Sweeps fine-tuning *recipes* (which parameters are unfrozen, the learning rate, ...) with
Ray Tune + Optuna, trains each trial through a sequence of skill stages on Ray Train, and
scores it on target-skill gain, held-out change and a counting-bias probe (MLflow logs all).
"""

__version__ = "0.1.0"
