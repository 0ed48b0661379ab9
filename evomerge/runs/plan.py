"""`evomerge plan RUN.yaml`: each memory mode's bytes per worker for a run's models, and the mode chosen.

Reads only the models' safetensors headers (shapes and dtypes: no tensor is loaded), the search
space (its merge method decides the workspace) and the workers' settings: how many share this
machine and which device they run on. The formula is `evomerge.merge.memory_plan`'s. A search
prints the same block before it starts and refuses a run that fits in no mode
(`preflight.check_memory`); a cluster's workers (`workers.address`) choose on their own machines, so
there this machine's numbers are only shown.
"""
from __future__ import annotations

import math
import os

from evomerge.merge import memory_plan
from evomerge.merge.memory_plan import MemoryPlan, ModelShapes, choose_mode, mode_needs
from evomerge.runs.config import RunConfig, load_run_config

__all__ = ["plan_run"]


def plan_run(config: RunConfig | str | os.PathLike) -> MemoryPlan:
    """The memory plan of a run config (a `RunConfig` or a YAML path), per worker, with the mode chosen."""
    import torch

    from evomerge._device import default_device
    from evomerge.search.space import SearchSpace

    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    models, workers = config.models, config.workers
    shapes = ModelShapes.from_folders(models.base, models.experts, allow_pickle=models.allow_pickle)
    method = SearchSpace.load(config.search_space).method
    remote = workers.backend == "ray" and bool(workers.address)
    count = 1 if workers.backend == "inprocess" else workers.num_workers
    if remote:  # the cluster's device need not exist here
        device = torch.device(workers.device) if workers.device else default_device()
    else:
        device = default_device(workers.device)
    local = 1 if remote else count  # workers sharing this machine's host memory
    host_free = memory_plan.host_available() // local
    if device.type == "cuda" and not torch.cuda.is_available():
        device_free = 0  # a cluster's GPU, none here
    elif device.type == "cuda":
        gpus = max(1, torch.cuda.device_count())
        used = range(min(local, gpus)) if device.index is None else [device.index]
        per_gpu = math.ceil(local / len(used))  # workers beyond one per GPU share one
        device_free = min(memory_plan.free_memory(torch.device("cuda", i)) for i in used) // per_gpu
    else:
        device_free = host_free
    sorts = workers.threads_per_worker if device.type == "cpu" else 1  # the CPU pool sorts side by side
    plan = MemoryPlan(shapes, method, str(device), mode_needs(shapes, method, cuda=device.type == "cuda",
                                                              sort_workers=sorts),
                      device_free=device_free, host_free=host_free, requested=workers.memory, workers=count,
                      remote=remote)
    return choose_mode(plan)
