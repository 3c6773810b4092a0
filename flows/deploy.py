"""Serve the segment-archive flow on a cron schedule against a Prefect server.

`serve_deployment` registers the deployment `segment-archive/<name>` on the server that
PREFECT_API_URL names and then runs its scheduled (and manually triggered) runs in this
process until it is stopped. Prefect's ephemeral API cannot hold schedules, so a real
`prefect server start` is needed. Every input is checked before anything is registered:
a typo in a card name or a cron field must fail now, not at 02:00.

The work-pool alternative (a worker in the GPU container picks the runs up) is
infra/prefect.yaml.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from prefect.client.schemas.schedules import CronSchedule
from prefect.types.entrypoint import EntrypointType
from pydantic import ValidationError

from flows.archive_flow import segment_archive
from flows.options import RunOptions, add_run_options, options_from_args
from flows.run import prepare_run
from pipelines import storage
from pipelines.errors import InputError
from pipelines.sources import list_archive

# Given as their own arguments; in `parameters` they would be said twice.
REQUIRED_PARAMETERS = ("archive", "model", "out")


def serve_deployment(
    archive: str,
    model: str,
    out: str,
    cron: str,
    name: str = "nightly",
    parameters: dict | None = None,
    timezone: str | None = None,
    options: RunOptions | None = None,
) -> None:
    """Serve `segment-archive/<name>`: `archive` segmented with `model` into `out` with `options`
    (every option of `segpipe run`) at every `cron` time (in `timezone`, an IANA name; default
    UTC). `parameters` are further flow parameters by name. Blocks until the process is
    stopped; the schedule is paused when it stops."""
    deployment_parameters = flow_parameters(archive, model, out, parameters, options)
    schedule = cron_schedule(cron, timezone)
    if not name or "/" in name:
        raise InputError(name, "a deployment name must be non-empty and contain no '/'")
    images_now = len(list_archive(deployment_parameters["archive"]))
    api_url = require_prefect_server()

    full_name = f"{segment_archive.name}/{name}"
    print(f"deployment: {full_name} (cron '{schedule.cron}' {schedule.timezone or 'UTC'}) on {api_url}", flush=True)
    print(f"archive:    {deployment_parameters['archive']} ({images_now} images now)", flush=True)
    print(f"run it now: prefect deployment run '{full_name}'", flush=True)
    segment_archive.serve(
        name=name,
        schedules=[schedule],
        parameters=deployment_parameters,
        # By module path, so runs work from any directory where segpipe is installed.
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_starting_message=False,
    )


def flow_parameters(archive: str, model: str, out: str, extra: dict | None = None,
                    options: RunOptions | None = None) -> dict:
    """The deployment's parameters, checked against the flow's signature; the card must load
    and the options must resolve against it, as a run would check them.

    Local paths are made absolute: the deployment outlives the shell it was started from.
    Options left at their defaults are not written into the deployment."""
    if options is not None and options.regions:
        options = options.model_copy(update={"regions": absolute_if_local(options.regions)})
    prepare_run(model, out, options)
    known = inspect.signature(segment_archive.fn).parameters
    extra = dict(extra or {})
    if options is not None and options != RunOptions():
        if "options" in extra:
            raise InputError("options", "given both as run options and in parameters")
        extra["options"] = options.model_dump(mode="json", exclude_defaults=True)
    for key in extra:
        if key in REQUIRED_PARAMETERS:
            raise InputError(key, "given both as an argument and in parameters")
        if key not in known:
            raise InputError(key, f"not a parameter of {segment_archive.name} (it takes {', '.join(known)})")
    return {
        "archive": absolute_if_local(archive),
        "model": absolute_if_local(model) if Path(model).exists() else model,
        "out": absolute_if_local(out),
        **extra,
    }


def cron_schedule(cron: str, timezone: str | None = None) -> CronSchedule:
    """Prefect's cron schedule, validated as the server will (five fields, no random/hashed
    expressions, a known IANA timezone)."""
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        if exc.errors()[0]["loc"][0] == "timezone":
            raise InputError(f"timezone '{timezone}'", "not an IANA timezone name (e.g. Europe/Berlin)") from exc
        raise InputError(f"cron '{cron}'", "not a valid cron expression (minute hour day-of-month month "
                                           "day-of-week, e.g. '0 2 * * *' for 02:00 every day)") from exc


def require_prefect_server() -> str:
    """The URL of the Prefect server that will hold the schedule; it must answer."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise InputError("PREFECT_API_URL", "not set: a schedule needs a Prefect server "
                                            "(prefect server start), not the ephemeral API")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise InputError(api_url, f"no Prefect server answers ({failure})")
    return api_url


def absolute_if_local(uri: str) -> str:
    return uri if storage.is_remote(uri) else str(Path(uri).absolute())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=serve_deployment.__doc__)
    parser.add_argument("archive", help="a local folder or s3:// prefix of images")
    parser.add_argument("--model", required=True, help="a built-in card name or a card YAML path")
    parser.add_argument("--out", required=True, help="output root (local folder or s3:// prefix)")
    parser.add_argument("--cron", required=True, help='when to run, e.g. "0 2 * * *" (02:00 every day)')
    parser.add_argument("--timezone", help="IANA timezone of the cron times (default UTC)")
    parser.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    add_run_options(parser, archive=True)
    args = parser.parse_args(argv)
    try:
        serve_deployment(args.archive, args.model, args.out, args.cron, name=args.name, timezone=args.timezone,
                         options=options_from_args(args))
    except InputError as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
