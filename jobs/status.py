"""`kvdistill jobs status`: which shard of which teacher is complete, partial (its task died and
left a leftover under the hidden partial directory) or missing, and the exact `--array=` to
resubmit for each teacher."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from kvdistill.schemas import JobsConfig
from kvdistill.store.layout import (
    INDEX,
    disk_usage,
    lock_path,
    partial_attempts,
    read_store_spec,
    read_teacher_specs,
    shard_attrs,
    shard_name,
    teacher_dir,
)
from kvdistill.store.lock import lock_holder

from .slurm import array_spec

__all__ = ["shard_states", "status", "format_status"]


def shard_states(store: str | Path, teachers: list[str], num_shards: int) -> dict[str, list[dict]]:
    """Per teacher, per shard: {"shard", "state": complete | running | partial | missing, "rows",
    "samples", "bytes"}; rows and samples only for complete shards, bytes on disk of the shard
    (or of its partial leftovers); "owner" (host, pid, start) of a running one, whose writer
    holds the shard's lock."""
    out: dict[str, list[dict]] = {}
    for name in teachers:
        rows = []
        for i in range(num_shards):
            final = teacher_dir(store, name) / shard_name(i)
            attrs = shard_attrs(final)
            leftovers = partial_attempts(store, name, i)
            owner = lock_holder(lock_path(store, name, i))
            if attrs and attrs.get("complete"):
                row = {
                    "state": "complete",
                    "rows": attrs["rows"],
                    "samples": attrs["samples"],
                    "bytes": disk_usage(final),
                }
            elif owner is not None:  # a live writer holds it: not a leftover to redo
                nbytes = sum(disk_usage(p) if p.is_dir() else p.stat().st_size for p in leftovers)
                row = {"state": "running", "rows": None, "samples": None, "bytes": nbytes, "owner": owner}
            elif leftovers or final.exists():  # a visible but unmarked shard is as good as partial
                nbytes = sum(disk_usage(p) if p.is_dir() else p.stat().st_size for p in leftovers)
                row = {
                    "state": "partial",
                    "rows": None,
                    "samples": None,
                    "bytes": nbytes + (disk_usage(final) if final.exists() else 0),
                }
            else:
                row = {"state": "missing", "rows": None, "samples": None, "bytes": 0}
            rows.append({"shard": i, **row})
        out[name] = rows
    return out


def status(store: str | Path, cfg: JobsConfig | None = None) -> dict[str, Any]:
    """Shard states of every teacher (those of `cfg`, else those in the store) and, per teacher,
    the shards to redo with the sbatch line that resubmits exactly those."""
    store = Path(store)
    exists = (store / "zarr.json").exists()
    if cfg is not None:
        teachers = [t.short_name for t in cfg.teachers]
        num_shards = cfg.dump.num_shards
        if exists and read_store_spec(store).num_shards != num_shards:
            raise ValueError(
                f"store {store} has {read_store_spec(store).num_shards} shards per teacher, the jobs "
                f"config says {num_shards}; pass the config the store was dumped with"
            )
    else:
        num_shards = read_store_spec(store).num_shards  # StoreError names the fix if no store
        teachers = list(read_teacher_specs(store))
    states = shard_states(store, teachers, num_shards)
    info: dict[str, Any] = {
        "store": str(store),
        "num_shards": num_shards,
        "finalized": (store / INDEX).exists(),
        "teachers": {},
    }
    for name, shards in states.items():
        todo = [
            s["shard"] for s in shards if s["state"] not in ("complete", "running")
        ]  # a running one is not resubmitted
        array = f"--array={array_spec(todo, cfg.slurm.max_parallel if cfg else None)}" if todo else None
        resubmit = None
        if todo and cfg is not None:
            script = Path(cfg.jobs_dir).absolute() / f"dump-{name}.sbatch"
            resubmit = shlex.join(["sbatch", array, str(script)])
        info["teachers"][name] = {
            "shards": shards,
            "complete": len(shards) - len(todo),
            "missing": [s["shard"] for s in shards if s["state"] == "missing"],
            "partial": [s["shard"] for s in shards if s["state"] == "partial"],
            "running": [s["shard"] for s in shards if s["state"] == "running"],
            "array": array,
            "resubmit": resubmit,
        }
    info["complete"] = bool(teachers) and all(not t["array"] and not t["running"] for t in info["teachers"].values())
    return info


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_status(info: dict[str, Any]) -> str:
    N = info["num_shards"]
    lines = [
        f"store {info['store']}: {len(info['teachers'])} teacher(s) x {N} shards"
        + (
            ("  (finalized)" if info["complete"] else "  (its index.parquet is out of date)")
            if info["finalized"]
            else ""
        ),
        f"{'teacher':<20} {'shard':>5}  {'state':<8} {'samples':>8} {'rows':>10} {'bytes':>10}",
    ]
    for name, t in info["teachers"].items():
        for s in t["shards"]:
            samples, rows = ("-" if s[k] is None else s[k] for k in ("samples", "rows"))
            lines.append(
                f"{name:<20} {s['shard']:>5}  {s['state']:<8} {samples:>8} {rows:>10} {_size(s['bytes']):>10}"
            )
    lines.append("")
    for name, t in info["teachers"].items():
        running = "".join(
            f"; shard {s['shard']} running ({s['owner']})" for s in t["shards"] if s["state"] == "running"
        )
        if not t["array"]:
            lines.append(f"{name}: {t['complete']}/{N} complete{running}")
            continue
        what = "; ".join(f"{k} {', '.join(map(str, t[k]))}" for k in ("missing", "partial") if t[k]) + running
        how = t["resubmit"] or f"{t['array']} (pass the jobs config for the sbatch line)"
        lines.append(f"{name}: {t['complete']}/{N} complete; {what}; resubmit: {how}")
    if info["complete"] and info["finalized"]:
        lines.append(
            f"all {N} shards of every teacher are complete: the store is finalized "
            f"(re-run `kvdistill store finalize {info['store']}` after redoing a shard)"
        )
    elif info["complete"]:
        lines.append(f"all {N} shards of every teacher are complete: run `kvdistill store finalize {info['store']}`")
    elif not info["teachers"]:
        lines.append("no teachers in the store yet: run the dump arrays (`kvdistill jobs slurm --submit`)")
    return "\n".join(lines)
