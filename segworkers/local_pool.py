"""The pool interface of segworkers.actors without Ray: the model in this process, for work that
does not need a cluster (segworkers.cluster.runs_in_driver, one small image). No Ray import:
a command that runs its model here does not pay for it."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

from pipelines.model_card import ModelCard
from segworkers.predictor import BlockJob, BlockPredictor, BlockResult

GROUPS_IN_FLIGHT = 2

# Small blocks (chips, slide regions) are segmented in groups of about this many batches of
# tiles: a call per block would pay a round trip and a part-empty last batch each time.
GROUP_BATCHES = 16


class LocalPool:
    """The pool's interface without Ray: one predictor in this process. The same predictor code,
    threads, batches and groups as an actor's, so the same labels, byte for byte."""

    def __init__(self, card: ModelCard, device: str = "cpu", batch_size: int = 4, threads: int = 2):
        self.predictor = BlockPredictor(card, device=device, batch_size=batch_size, threads=threads)
        self.group_tiles = GROUP_BATCHES * batch_size
        # One caller at a time: the predictor's lanes already fill the CPUs, and images in
        # progress at once (segpipe run --concurrency) then do their other stages meanwhile.
        self.lock = threading.Lock()
        # Two groups at once, as on an actor (BLOCKS_IN_FLIGHT_PER_ACTOR): while one group's
        # batches are on the lanes, the other's block is normalised or its labels taken.
        self.groups = ThreadPoolExecutor(max_workers=GROUPS_IN_FLIGHT, thread_name_prefix="block-group")

    def run(self, jobs: list[BlockJob], on_block_done: Callable[[int, BlockResult], None] = lambda i, r: None
            ) -> list[BlockResult]:
        with self.lock:
            return self.run_alone(jobs, on_block_done)

    def run_alone(self, jobs: list[BlockJob], on_block_done: Callable[[int, BlockResult], None]) -> list[BlockResult]:
        """The groups, GROUPS_IN_FLIGHT at a time; `on_block_done` is called in this thread, as
        groups finish. Returns the results in the jobs' order."""
        results: list[BlockResult | None] = [None] * len(jobs)
        groups = iter(block_groups(jobs, self.group_tiles))
        in_flight = {}
        try:
            while True:
                while len(in_flight) < GROUPS_IN_FLIGHT and (indexes := next(groups, None)) is not None:
                    in_flight[self.groups.submit(self.predictor.segment_group, [jobs[i] for i in indexes])] = indexes
                if not in_flight:
                    return results
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    indexes = in_flight.pop(future)
                    for index, result in zip(indexes, future.result()):
                        results[index] = result
                        on_block_done(index, result)
        finally:
            for future in in_flight:  # an error: the groups still running are waited for, not left behind
                future.cancel()
            wait(in_flight)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def block_groups(jobs: list[BlockJob], group_tiles: int) -> list[list[int]]:
    """Indexes of the jobs in groups of consecutive jobs of at most `group_tiles` tiles together
    (a job with more is a group of its own)."""
    groups: list[list[int]] = []
    tiles = 0
    for index, job in enumerate(jobs):
        if groups and tiles + len(job.tiles) <= group_tiles:
            groups[-1].append(index)
            tiles += len(job.tiles)
        else:
            groups.append([index])
            tiles = len(job.tiles)
    return groups
