"""Ray actors that own a model and segment blocks: one per GPU, or CPU actors without one.

The driver keeps a bounded number of blocks in flight per actor, so a slow actor never piles
up work and results (class counts only; labels go straight to Zarr) stay small. An actor runs
its blocks in flight on as many threads, so one block's Zarr reads and writes overlap
another's compute.
"""

from __future__ import annotations

import dataclasses
import os
import queue
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


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (host:port of its head, "auto", or ray://host:10001 for a
    Ray Client), else the one named by RAY_ADDRESS, else start a local one, on first use.

    With token authentication on (RAY_AUTH_MODE=token), the token comes from RAY_AUTH_TOKEN or
    the file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), as for any Ray driver."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")


@ray.remote(max_concurrency=BLOCKS_IN_FLIGHT_PER_ACTOR)
class SegmentationActor:
    """A threaded actor: each block in flight runs on its own thread (BlockPredictor is thread-safe)."""

    def __init__(self, card: ModelCard, device: str, batch_size: int, threads: int):
        self.predictor = BlockPredictor(card, device=device, batch_size=batch_size, threads=threads)

    def segment(self, job: BlockJob) -> BlockResult:
        result = self.predictor.segment(job)
        return dataclasses.replace(result, node=ray.get_runtime_context().get_node_id())


def actor_plan(device: str, workers: int | None, threads: int) -> tuple[int, dict]:
    """How many actors to start and the resources each asks for.

    CPU actors are sized to fit the cluster's nodes: an actor asking for more CPUs than any one
    node has would wait forever (two 1-CPU nodes are 2 CPUs, but not one 2-CPU actor)."""
    if device == "cuda":
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if workers:  # GPU actors the cluster cannot place yet wait for its autoscaler to add GPU nodes
            return workers, {"num_gpus": 1, "num_cpus": 1}
        if gpus == 0:
            raise RuntimeError("--device cuda, but the Ray cluster has no GPU (on a cluster whose GPU nodes "
                               "scale from zero, say how many GPU actors to start with --workers N)")
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    node_cpus = [int(cpus) for cpus in node_cpus if cpus >= 1] or [1]  # a head with CPU 0 runs no actor
    if workers:  # asked for: share the CPUs between them, fractionally if need be
        return workers, {"num_gpus": 0, "num_cpus": min(sum(node_cpus) / workers, min(node_cpus))}
    per_actor = min(threads, min(node_cpus))
    return sum(cpus // per_actor for cpus in node_cpus), {"num_gpus": 0, "num_cpus": per_actor}


class ActorPool:
    """Long-lived segmentation actors shared by every image of a run (the model is loaded once
    per actor), each with a bounded number of blocks in flight. Thread-safe: several images
    can stream their blocks into one pool at once, so the last big image of a run keeps every
    actor busy.

    A killed actor process is restarted by Ray, which retries the block it was running
    (`max_task_retries`): the block is written again, whole, by the new process.
    """

    def __init__(self, card: ModelCard, device: str = "cpu", batch_size: int = 4, workers: int | None = None,
                 threads: int = 2, max_actors: int | None = None, restarts: int = 3):
        ensure_ray()
        count, resources = actor_plan(device, workers, threads)
        if max_actors:
            count = min(count, max_actors)
        if device == "cpu":
            threads = max(1, int(resources["num_cpus"]))
        env_vars = {name: os.environ[name] for name in STORAGE_ENVIRONMENT if name in os.environ}
        if env_vars:
            resources = {**resources, "runtime_env": {"env_vars": env_vars}}
        self.actors = [
            SegmentationActor.options(**resources, max_restarts=restarts, max_task_retries=restarts).remote(
                card, device, batch_size, threads)
            for _ in range(count)
        ]
        self.slots: queue.Queue = queue.Queue()
        for _ in range(BLOCKS_IN_FLIGHT_PER_ACTOR):
            for actor in self.actors:
                self.slots.put(actor)

    def run(self, jobs: list[BlockJob], on_block_done: Callable[[int, BlockResult], None] = lambda i, r: None
            ) -> list[BlockResult]:
        """Run the jobs on the pool's actors; results in job order. `on_block_done(index, result)`
        is called as each block finishes."""
        results: dict[int, BlockResult] = {}
        in_flight: dict[ray.ObjectRef, tuple[int, object]] = {}
        waiting = list(enumerate(jobs))
        waiting.reverse()
        try:
            while waiting or in_flight:
                while waiting:  # take every free slot, waiting for one only when nothing is in flight
                    try:
                        actor = self.slots.get(block=not in_flight, timeout=None if not in_flight else 0)
                    except queue.Empty:
                        break
                    index, job = waiting.pop()
                    in_flight[actor.segment.remote(job)] = (index, actor)
                if not in_flight:
                    continue
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in done:
                    index, actor = in_flight.pop(ref)
                    self.slots.put(actor)
                    results[index] = ray.get(ref)
                    on_block_done(index, results[index])
        finally:
            for ref, (_, actor) in in_flight.items():  # an error: give the other slots back
                ray.cancel(ref, force=False)
                self.slots.put(actor)
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def segment_blocks(
    card: ModelCard,
    jobs: list[BlockJob],
    device: str = "cpu",
    batch_size: int = 4,
    workers: int | None = None,
    threads: int = 2,
    on_block_done: Callable[[int, BlockResult], None] = lambda index, result: None,
    pool: ActorPool | None = None,
) -> list[BlockResult]:
    """Run every block job on a pool of actors (the given one, or one made for these jobs) and
    return the results in job order."""
    if pool is not None:
        return pool.run(jobs, on_block_done)
    if not jobs:
        return []
    with ActorPool(card, device, batch_size, workers, threads, max_actors=len(jobs)) as own_pool:
        return own_pool.run(jobs, on_block_done)
