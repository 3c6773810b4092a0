"""The pool interface of segworkers.actors without Ray: the model in this process, for work that
does not need a cluster (segworkers.cluster.runs_in_driver, one small image). No Ray import:
a command that runs its model here does not pay for it."""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

from pipelines.model_card import ModelCard
from segworkers.predictor import BlockJob, BlockPredictor, BlockResult

GROUPS_IN_FLIGHT = 2

# Small blocks (chips, slide regions) are segmented in groups of about this many batches of
# tiles: a call per block would pay a round trip and a part-empty last batch each time.
GROUP_BATCHES = 16


class WorkStopped(Exception):
    """The pool was stopped (Ctrl-C in a night): the blocks in progress were finished and handed
    back, the rest were not started."""

    def __init__(self):
        super().__init__("stopped: the command was interrupted; the blocks finished are kept")


class LocalPool:
    """The pool's interface without Ray: one predictor in this process. The same predictor code,
    threads, batches and groups as an actor's, so the same labels, byte for byte."""

    def __init__(self, card: ModelCard, device: str = "cpu", batch_size: int = 4, threads: int = 2):
        self.predictor = BlockPredictor(card, device=device, batch_size=batch_size, threads=threads)
        self.group_tiles = GROUP_BATCHES * batch_size
        # Two groups at once, as on an actor (BLOCKS_IN_FLIGHT_PER_ACTOR): while one group's
        # batches are on the lanes, the other's block is normalised or its labels taken.
        self.groups = ThreadPoolExecutor(max_workers=GROUPS_IN_FLIGHT, thread_name_prefix="block-group")
        # Callers (images, or batches of them, in progress at once: segpipe run --concurrency)
        # take turns: the first to come submits all its groups before the next submits any, so
        # its stage ends early and its other stages run while the next one's blocks are on the
        # lanes. The next caller's first groups take the slots its last ones leave: without
        # waiting for the whole call, the lanes stood idle for about 0.8 s between two 4096²
        # images (reading and normalising the next image's first blocks).
        self.turn = threading.Condition()
        self.callers: collections.deque = collections.deque()
        self.free_slots = GROUPS_IN_FLIGHT
        self.stopping = threading.Event()

    def stop(self) -> None:
        """From any thread: no group is started from now on; the calls in progress hand back the
        groups in flight, then raise WorkStopped."""
        with self.turn:
            self.stopping.set()
            self.turn.notify_all()

    def run(self, jobs: list[BlockJob], on_block_done: Callable[[int, BlockResult], None] = lambda i, r: None
            ) -> list[BlockResult]:
        """The jobs' blocks, in groups, GROUPS_IN_FLIGHT groups at a time (this call's and
        others'); `on_block_done` is called in this thread as groups finish. Returns the results
        in the jobs' order."""
        results: list[BlockResult | None] = [None] * len(jobs)
        groups = iter(block_groups(jobs, self.group_tiles))
        pending = next(groups, None)
        in_flight: dict = {}
        finished: collections.deque = collections.deque()
        me = object()

        def group_done(future) -> None:
            with self.turn:
                self.free_slots += 1
                finished.append(future)
                self.turn.notify_all()

        def may_submit() -> bool:
            return pending is not None and self.free_slots > 0 and self.callers[0] is me and not self.stopping.is_set()

        def stopped() -> bool:
            return self.stopping.is_set() and pending is not None and not in_flight

        with self.turn:
            self.callers.append(me)
        try:
            while pending is not None or in_flight:
                with self.turn:
                    self.turn.wait_for(lambda: finished or may_submit() or stopped())
                    if stopped():
                        raise WorkStopped()
                    while may_submit():
                        self.free_slots -= 1
                        future = self.groups.submit(self.predictor.segment_group, [jobs[i] for i in pending])
                        in_flight[future] = pending
                        pending = next(groups, None)
                        if pending is None:  # the next caller's turn
                            self.callers.remove(me)
                            self.turn.notify_all()
                        future.add_done_callback(group_done)
                    done = list(finished)
                    finished.clear()
                for future in done:
                    indexes = in_flight.pop(future)
                    for index, result in zip(indexes, future.result()):
                        results[index] = result
                        on_block_done(index, result)
            return results
        finally:
            with self.turn:
                if me in self.callers:
                    self.callers.remove(me)
                    self.turn.notify_all()
            for future in in_flight:  # an error: the groups still running are waited for, not left behind
                future.cancel()
            wait(in_flight)

    def close(self) -> None:
        """End the pool's threads (its groups' and the predictor's lanes): left running, each
        pool's idle threads stayed for the life of the process (a resident server's, or a
        test session's) and their OpenMP teams slowed every later torch call of it."""
        self.groups.shutdown(wait=True)
        self.predictor.close()

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
