"""Ray actors that own a model and segment blocks: one per GPU, or CPU actors without one.

The driver keeps a bounded number of blocks in flight per actor, so a slow actor never piles
up work and results (class counts only; labels go straight to Zarr) stay small.
"""

from __future__ import annotations

import os
from typing import Callable

import ray

from pipelines.model_card import ModelCard
from segworkers.predictor import BlockJob, BlockPredictor, BlockResult

BLOCKS_IN_FLIGHT_PER_ACTOR = 2
# Object-storage settings the driver runs with; actors get the same so they can read s3:// stores.
STORAGE_ENVIRONMENT = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
)


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one on first use."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="WARNING")


@ray.remote
class SegmentationActor:
    def __init__(self, card: ModelCard, device: str, batch_size: int, threads: int):
        self.predictor = BlockPredictor(card, device=device, batch_size=batch_size, threads=threads)

    def segment(self, job: BlockJob) -> BlockResult:
        return self.predictor.segment(job)


def actor_plan(device: str, workers: int | None, threads: int) -> tuple[int, dict]:
    """How many actors to start and the resources each asks for."""
    resources = ray.cluster_resources()
    if device == "cuda":
        gpus = int(resources.get("GPU", 0))
        if gpus == 0:
            raise RuntimeError("--device cuda, but the Ray cluster has no GPU")
        return workers or gpus, {"num_gpus": 1, "num_cpus": 1}
    cpus = int(resources.get("CPU", 1))
    if workers:  # asked for: share the CPUs between them, fractionally if need be
        return workers, {"num_gpus": 0, "num_cpus": cpus / workers}
    return max(1, cpus // threads), {"num_gpus": 0, "num_cpus": min(threads, cpus)}


def segment_blocks(
    card: ModelCard,
    jobs: list[BlockJob],
    device: str = "cpu",
    batch_size: int = 4,
    workers: int | None = None,
    threads: int = 2,
    on_block_done: Callable[[BlockResult], None] = lambda result: None,
) -> list[BlockResult]:
    """Run every block job on a pool of actors and return the results in job order."""
    ensure_ray()
    count, resources = actor_plan(device, workers, threads)
    if device == "cpu":
        threads = max(1, int(resources["num_cpus"]))
    env_vars = {name: os.environ[name] for name in STORAGE_ENVIRONMENT if name in os.environ}
    if env_vars:
        resources = {**resources, "runtime_env": {"env_vars": env_vars}}
    actors = [
        SegmentationActor.options(**resources).remote(card, device, batch_size, threads)
        for _ in range(min(count, len(jobs)))
    ]
    results: dict[int, BlockResult] = {}
    in_flight: dict[ray.ObjectRef, tuple[int, object]] = {}
    queue = list(enumerate(jobs))
    try:
        for actor in actors:
            for _ in range(BLOCKS_IN_FLIGHT_PER_ACTOR):
                if queue:
                    index, job = queue.pop(0)
                    in_flight[actor.segment.remote(job)] = (index, actor)
        while in_flight:
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            index, actor = in_flight.pop(done)
            results[index] = ray.get(done)
            on_block_done(results[index])
            if queue:
                next_index, job = queue.pop(0)
                in_flight[actor.segment.remote(job)] = (next_index, actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return [results[i] for i in range(len(jobs))]
