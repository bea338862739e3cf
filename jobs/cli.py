"""`kvdistill jobs local | slurm | status`: run every teacher x shard dump task of a store on
this machine, as SLURM job arrays (+ finalize, + optional training), and see what is missing."""

from __future__ import annotations

import argparse
from typing import Any

from kvdistill.schemas import JobsConfig, JobsLocalConfig, JobsSlurmConfig, JobsStatusConfig, TrainConfig
from kvdistill.schemas.base import _over, apply_overrides, read_config
from kvdistill.schemas.cli import add_flags, config_from_args, flags_of


class SubmitError(RuntimeError):
    """sbatch is missing or refused a job; the message holds its output and what was already submitted."""


FLAGS = flags_of(JobsConfig)  # the fields the two share; train_settings reads the --train.FIELD ones
LOCAL_FLAGS = flags_of(JobsLocalConfig)
SLURM_FLAGS = flags_of(JobsSlurmConfig)


def add_parser(sub) -> None:
    p = sub.add_parser("jobs", help="run dump arrays locally or on SLURM; status of a store", description=__doc__)
    jsub = p.add_subparsers(dest="jobs_command", required=True)
    local = jsub.add_parser("local", help="run every dump task here as N processes, then finalize")
    add_flags(local, JobsLocalConfig)
    local.set_defaults(func=local_main)
    slurm = jsub.add_parser(
        "slurm", help="write sbatch scripts (one array per teacher, finalize, train); --submit submits them"
    )
    add_flags(slurm, JobsSlurmConfig)
    slurm.set_defaults(func=slurm_main)
    status = jsub.add_parser("status", help="per teacher x shard: complete / partial / missing, and what to resubmit")
    # Its --config is a field (the jobs config to read), not a JobsStatusConfig file.
    add_flags(status, JobsStatusConfig, config=False, progress=False)
    status.set_defaults(func=status_main)


def local_main(args: argparse.Namespace) -> int:
    from kvdistill.store import finalize, format_inspect, inspect

    from .local import run_local

    cfg = config_from_args(JobsLocalConfig, args, LOCAL_FLAGS)
    run_local(cfg.tasks(), workers=cfg.workers, progress=not args.no_progress)
    if cfg.finalize:
        finalize(cfg.dump.store)
        print(format_inspect(inspect(cfg.dump.store)))
    return 0


def train_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The TrainConfig fields the user set for the training job: the jobs config's `train:`
    mapping, the `--train.FIELD` flags over it, layered as `kvdistill train` layers its --config
    and flags (--train.warmup-steps drops the file's warmup_ratio). None: no training job."""
    data = read_config(args.config, JobsConfig).get("train") if getattr(args, "config", None) else None
    flags = {f.key.removeprefix("train."): getattr(args, f.key, None) for f in FLAGS if f.key.startswith("train.")}
    flags = {k: v for k, v in flags.items() if v is not None}
    if data is None and not flags:
        return None
    return apply_overrides(_over(TrainConfig, dict(data or {}), {k.split(".")[0] for k in flags}), flags)


def slurm_main(args: argparse.Namespace) -> int:
    from .slurm import submit, write_scripts

    cfg = config_from_args(JobsSlurmConfig, args, SLURM_FLAGS)
    # Only what the user set goes to the job's config, so the recipe of its mode sits under it.
    scripts = write_scripts(cfg, args.config, train=train_settings(args) if cfg.train is not None else None)
    for name, path in scripts.items():
        print(f"wrote {name}: {path}")
    try:
        submitted = submit(scripts, dry_run=not cfg.submit)
    except RuntimeError as e:  # submit raises only for sbatch missing or failing
        raise SubmitError(str(e)) from e
    for name, argv, job_id in submitted:
        print(f"{name}: {' '.join(argv)}" + (f"  -> job {job_id}" if job_id else "  (not submitted)"))
    if not cfg.submit:
        print("nothing submitted; add --submit to submit these")
    return 0


def status_main(args: argparse.Namespace) -> int:
    from .status import format_status, status

    opts = config_from_args(JobsStatusConfig, args, config=False)
    cfg = JobsConfig.load(opts.config) if opts.config else None
    print(format_status(status(opts.store, cfg)))
    return 0
