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
import threading
from typing import Callable

import ray

from pipelines.model_card import ModelCard
from segworkers.cluster import STORAGE_ENVIRONMENT, ensure_ray, worker_error
from segworkers.local_pool import GROUP_BATCHES, WorkStopped, block_groups
from segworkers.predictor import BlockJob, BlockPredictor, BlockResult

BLOCKS_IN_FLIGHT_PER_ACTOR = 2


@ray.remote(max_concurrency=BLOCKS_IN_FLIGHT_PER_ACTOR)
class SegmentationActor:
    """A threaded actor: each group of blocks in flight runs on its own thread (BlockPredictor is
    thread-safe)."""

    def __init__(self, card: ModelCard, device: str, batch_size: int, threads: int,
                 environment: dict[str, str] | None = None):
        os.environ.update(environment or {})
        self.load_error: Exception | None = None
        try:
            self.predictor = BlockPredictor(card, device=device, batch_size=batch_size, threads=threads)
        except Exception as exc:  # noqa: BLE001 - given back with each block, where the driver can read it
            self.load_error = exc

    def segment(self, jobs: list[BlockJob]) -> list[BlockResult]:
        """A group of blocks, their tiles in shared batches (BlockPredictor.segment_group)."""
        if self.load_error is not None:
            raise self.load_error
        node = ray.get_runtime_context().get_node_id()
        return [dataclasses.replace(result, node=node) for result in self.predictor.segment_group(jobs)]


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
        self.settings = self.settings_of(card, device, batch_size, workers, threads, max_actors, restarts)
        count, resources = actor_plan(device, workers, threads)
        if max_actors:
            count = min(count, max_actors)
        if device == "cpu":
            threads = max(1, int(resources["num_cpus"]))
        environment = {name: os.environ[name] for name in STORAGE_ENVIRONMENT if name in os.environ}
        self.actors = [
            SegmentationActor.options(**resources, max_restarts=restarts, max_task_retries=restarts).remote(
                card, device, batch_size, threads, environment)
            for _ in range(count)
        ]
        # Small blocks (chips, slide regions) are sent in groups of about this many tiles: a
        # call per block would pay Ray's round trip and a part-empty last batch each time.
        self.group_tiles = GROUP_BATCHES * batch_size
        self.slots: queue.Queue = queue.Queue()
        for _ in range(BLOCKS_IN_FLIGHT_PER_ACTOR):
            for actor in self.actors:
                self.slots.put(actor)
        self.stopping = threading.Event()

    def stop(self) -> None:
        """From any thread: no group is sent from now on; the calls in progress take back the
        groups in flight, then raise WorkStopped."""
        self.stopping.set()

    def run(self, jobs: list[BlockJob], on_block_done: Callable[[int, BlockResult], None] = lambda i, r: None
            ) -> list[BlockResult]:
        """Run the jobs on the pool's actors; results in job order. `on_block_done(index, result)`
        is called as each block finishes. Small blocks go in groups (block_groups), whose tiles
        the actor runs in shared batches."""
        results: dict[int, BlockResult] = {}
        in_flight: dict[ray.ObjectRef, tuple[list[int], object]] = {}
        waiting = block_groups(jobs, self.group_tiles)
        waiting.reverse()
        try:
            while waiting or in_flight:
                if self.stopping.is_set() and not in_flight:
                    raise WorkStopped()
                while waiting and not self.stopping.is_set():  # every free slot; waits only when nothing is in flight
                    try:  # (for half a second at a time: a stop is seen while waiting)
                        actor = self.slots.get(timeout=0.5) if not in_flight else self.slots.get(block=False)
                    except queue.Empty:
                        break
                    indexes = waiting.pop()
                    in_flight[actor.segment.remote([jobs[i] for i in indexes])] = (indexes, actor)
                if not in_flight:
                    continue
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in done:
                    indexes, actor = in_flight.pop(ref)
                    self.slots.put(actor)
                    try:
                        group = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise worker_error(exc) from None
                    for index, result in zip(indexes, group):
                        results[index] = result
                        on_block_done(index, result)
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

    @classmethod
    def prestart(cls, *settings) -> None:
        """Start a pool now (its actors load the model in the background) for a `take` of the
        same settings to come: a command starts its actors while the flow itself starts."""
        cls.discard_prestarted()
        _prestarted.append(cls(*settings))

    @classmethod
    def take(cls, *settings) -> "ActorPool":
        """The prestarted pool of these settings, else a new one."""
        if _prestarted and _prestarted[0].settings == cls.settings_of(*settings):
            return _prestarted.pop()
        cls.discard_prestarted()
        return cls(*settings)

    @classmethod
    def discard_prestarted(cls) -> None:
        while _prestarted:
            _prestarted.pop().close()

    @staticmethod
    def settings_of(card: ModelCard, device: str = "cpu", batch_size: int = 4, workers: int | None = None,
                    threads: int = 2, max_actors: int | None = None, restarts: int = 3) -> tuple:
        return card, device, batch_size, workers, threads, max_actors, restarts


_prestarted: list[ActorPool] = []


def segment_blocks(
    card: ModelCard,
    jobs: list[BlockJob],
    device: str = "cpu",
    batch_size: int = 4,
    workers: int | None = None,
    threads: int = 2,
    on_block_done: Callable[[int, BlockResult], None] = lambda index, result: None,
) -> list[BlockResult]:
    """Run every block job on a pool of actors made for these jobs and return the results in
    job order."""
    if not jobs:
        return []
    with ActorPool(card, device, batch_size, workers, threads, max_actors=len(jobs)) as own_pool:
        return own_pool.run(jobs, on_block_done)
