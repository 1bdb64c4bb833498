"""Two 1-CPU trials on a 2-CPU Ray: do they run at once? Prints each trial's worker start/end and the wall time.

    RAY_AIR_NEW_OUTPUT=0 python benchmarks/concurrent_trials.py
"""
import time, ray
from lmm_ray.cluster import TRIAL_DRIVER_RESOURCES
from ray import tune
import ray.train, ray.train.torch
from ray.tune.integration.ray_train import TuneReportCallback
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
def loop(config):
    import time
    t = time.time()
    time.sleep(8)
    ray.train.report({"start": t, "end": time.time()})
def trial(cfg):
    tid = tune.get_context().get_trial_id()
    ray.train.torch.TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=tid, storage_path="/tmp/res_test_store", callbacks=[TuneReportCallback()])).fit()
t0=time.time()
res = tune.Tuner(tune.with_resources(trial, TRIAL_DRIVER_RESOURCES), param_space={"x": tune.grid_search([1, 2])},
                 tune_config=tune.TuneConfig(max_concurrent_trials=2),
                 run_config=tune.RunConfig(storage_path="/tmp/res_test_store", name="t")).fit()
for r in res: print(r.metrics.get("start"), r.metrics.get("end"))
print("wall", time.time()-t0)
