"""Joining or starting the Ray cluster, without importing torch or the models: a command starts
Ray while it imports the rest; and whether a command needs Ray at all (Ray is imported only
when it does).

    ensure_ray()            # RAY_ADDRESS's cluster, or a local one
    ensure_ray("head:6379") # this one
"""

from __future__ import annotations

import os
import sys

from pipelines.errors import InputError

# Object-storage settings the driver runs with; actors get the same so they can read s3:// stores.
# They travel as the actors' constructor arguments, never as a runtime_env: Ray writes a
# runtime_env's variables into its session logs, in clear text.
STORAGE_ENVIRONMENT = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
)


# Torch threads of a CPU actor (segworkers.actors): a machine of fewer than twice as many CPUs
# gets one CPU actor by default.
CPU_ACTOR_THREADS = 2


def cluster_asked_for(workers: int | None, ray_address: str | None) -> bool:
    """Actors asked for (--workers), or a cluster named (cluster_named)."""
    return bool(workers) or cluster_named(ray_address)


def cluster_named(ray_address: str | None) -> bool:
    """A Ray cluster named to join: --ray-address, else RAY_ADDRESS."""
    return bool(ray_address or os.environ.get("RAY_ADDRESS"))


def runs_in_driver(device: str, workers: int | None, ray_address: str | None) -> bool:
    """Whether the model runs in the command's own process rather than on Ray actors: on the CPU
    of a machine that would get one CPU actor anyway, with no actors or cluster asked for.
    Starting Ray and that actor (about 12 s on a 2-core machine) then buys nothing: the same
    predictor, threads and batches give the same bytes in the driver."""
    return device == "cpu" and not cluster_asked_for(workers, ray_address) and \
        (os.cpu_count() or 1) < 2 * CPU_ACTOR_THREADS


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (host:port of its head, "auto", or ray://host:10001 for a
    Ray Client), else the one named by RAY_ADDRESS, else start a local one, on first use.

    With token authentication on (RAY_AUTH_MODE=token), the token comes from RAY_AUTH_TOKEN or
    the file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), as for any Ray driver."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's banners and its workers' output (torch's warnings, say) only when asked for
    # (segpipe -v): errors reach the driver as exceptions all the same.
    verbose = os.environ.get("SEGPIPE_VERBOSITY") == "verbose"
    quiet = {"logging_level": "WARNING" if verbose else "ERROR", "log_to_driver": verbose}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(include_dashboard=False, **quiet)


def worker_error(exc: BaseException) -> BaseException:
    """What a worker raised, as it raised it, where that matters to the driver: Ray delivers
    it wrapped in a RayTaskError whose message is the remote traceback, but bad input
    (InputError) and file system errors (OSError: its errno says full or read-only disk)
    keep their type and their one-line message."""
    if "ray" not in sys.modules:  # no Ray in this process: nothing came from a worker
        return exc
    import ray.exceptions

    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, (InputError, OSError)):
        return cause
    return exc
