"""`kvdistill store verify`: re-read every byte of a store and report what is wrong with it.

    problems = verify("out.zarr")          # [] when the store is sound
    print(format_problems(problems))

Checks, per teacher and shard (each problem names its teacher, shard, what and the fix):

- every shard 0..num_shards-1 is present and complete, and holds the teacher / shard its
  place says; no shard lies beyond num_shards;
- stale shards: the fingerprint a shard was written with (attrs `fingerprint`,
  `data_fingerprint`) equals the teacher's and the store's;
- the arrays are there with consistent shapes: k, v [rows, L_s, width] (decoded), input_ids
  and loss_mask [rows], offsets [samples + 1] from 0 up to rows, unique sample ids;
- crc32 of every array the shard's `crc32` attribute lists, recomputed from the stored
  (encoded) data in row order; a chunk that does not decode is a problem, not a crash;
- decoded K/V are finite (no NaN / Inf), read through `ShardReader.rows`;
- segment_ids, where stored, have one entry per row, each 0 / 1 / 2; examples (the samples'
  texts), where stored, one JSON {question, reasoning, answer} per sample;
- teacher logits (teacher spec `logits_top_k` K > 0): logits_ids int32 / logits_lp float16
  [rows, K] are there; ids lie in the vocabulary the record names, log-probs are finite, <= 0
  and descend along each row;
- latent mode (teacher spec `latent`): latent_k / latent_v [samples, M, L_s, width], latent_mask
  [samples, M], latent_pos [samples, M, L_t, H_t] and codi_hidden [samples, H] are there with
  M the spec's slots; the mask is exactly where latent_pos >= 0 (-1 elsewhere), real slots come
  first, positions ascend per (layer, head) and lie inside the sample's reasoning segment where
  the time map is identity; no NaN / Inf;
- shard i holds the same sample ids and lengths for every teacher;
- index.parquet exists ("not finalized" otherwise), decodes and agrees with every shard;
  index.parquet and the consolidated metadata have the checksums finalize recorded.

A folder that is not a store is StoreError (as for finalize and train); everything wrong inside
a store, its metadata files included, is a Problem.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from kvdistill.schemas import StoreSpec, TeacherSpec

from .errors import CorruptShard, StoreError
from .index import metadata_problems
from .layout import (
    INDEX,
    INDEX_COLUMNS,
    KEY,
    PARTIAL,
    group_attrs,
    partial_attempts,
    partial_dir,
    read_store_spec,
    shard_attrs,
    shard_name,
    shard_record_problems,
    sidecar_path,
    tar_path,
    teacher_dir,
)
from .reader import ShardReader, index_damage, read_index_table
from .rows import checked_reader, missing_chunks
from .writer import EXAMPLE_KEYS

__all__ = ["Problem", "verify", "format_problems"]

REQUIRED = ("k", "v", "input_ids", "loss_mask", "offsets", "sample_ids")
# The tail of a reader's error that sends the user to `kvdistill store verify` (store/rows.py, reader.py).
_SENDS_TO_VERIFY = re.compile(r"(; | \()(run |re-dump this shard \()?`kvdistill store verify[^`]*`[^;]*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: where (teacher / shard, None for the whole store), what, fix."""

    teacher: str | None
    shard: int | None
    what: str
    fix: str

    def __post_init__(self) -> None:
        # A reader's error read here points the user to `store verify` itself; `fix` says what to do instead.
        object.__setattr__(self, "what", _SENDS_TO_VERIFY.sub("", self.what))

    @property
    def where(self) -> str:
        if self.teacher is None:
            return "store"
        return f"teacher {self.teacher!r}" + ("" if self.shard is None else f" {shard_name(self.shard)}")

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; {self.fix}"


def _redump(teacher: str, shard: int, delete: bool = True) -> str:
    rerun = (
        f"re-run its dump task (`kvdistill dump --teacher-name {teacher} --shard {shard} ...`), "
        "then `kvdistill store finalize`"
    )
    return (
        f"delete the shard ({shard_name(shard)} of teacher {teacher!r}), {rerun}"
        if delete
        else rerun[0].upper() + rerun[1:]
    )


def _blocks(arr: zarr.Array) -> int:
    """Rows per read: one zarr shard (the write unit) when sharded, else one chunk."""
    rows = (arr.shards or arr.chunks)[0] if arr.ndim else 1
    return max(1, rows)


def _crc32(arr: zarr.Array, path: Path) -> int:
    """zlib.crc32 of the stored values in row order, as ShardWriter computes it while writing;
    read through the checked readers (every chunk's crc32c, no missing chunk)."""
    if arr.ndim == 0:
        return zlib.crc32(np.ascontiguousarray(arr[()]).tobytes())
    crc, step, reader = 0, _blocks(arr), checked_reader(arr, path)
    for start in range(0, arr.shape[0], step):
        crc = zlib.crc32(np.ascontiguousarray(reader[start : start + step]).tobytes(), crc)
    return crc


def _decode_error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def verify(path: str | Path, progress: bool = False) -> list[Problem]:
    """Every problem of the store at `path` ([] when sound). Reads every stored array once for
    the checksums, and K / V a second time, decoded through ShardReader, for NaN / Inf."""
    path = Path(path)
    try:
        spec = read_store_spec(path)
    except (
        CorruptShard
    ) as e:  # its root metadata is damaged: a finding (a folder that is no store is StoreError, exit 3)
        return [
            Problem(None, None, str(e), "restore the store's root zarr.json from a copy, or dump into a new --store")
        ]
    problems: list[Problem] = []
    teachers = _read_teachers(path, problems)
    damaged = {p.teacher for p in problems}  # teachers whose record is damaged: their shards are not checked
    if not teachers and not problems:
        problems.append(Problem(None, None, "holds no teachers", "run `kvdistill dump` into it"))
    problems += _other_metadata(path)
    index = _read_index(path, problems)
    first: dict[int, tuple[str, list[str], np.ndarray]] = {}  # shard -> (teacher, ids, offsets)
    bar = tqdm(total=len(teachers) * spec.num_shards, desc="verify", unit="shard", disable=not progress)
    for name, tspec in teachers.items():
        for i in range(spec.num_shards):
            bar.set_postfix_str(f"{name} {shard_name(i)}")
            found = _verify_shard(path, spec, tspec, i, problems)
            bar.update()
            rows = index.pop((name, i), None) if index is not None else None
            if found is None:  # already reported; its index rows cannot be checked against it
                continue
            ids, offsets = found
            if i not in first:
                first[i] = (name, ids, offsets)
            else:
                _compare_teachers(name, i, ids, offsets, first[i], problems)
            if index is not None:
                _compare_index(name, i, ids, offsets, rows, problems)
        problems += _extra_shards(path, name, spec.num_shards)
    bar.close()
    for (name, i), rows in sorted((index or {}).items()):
        if name in damaged:
            continue
        problems.append(
            Problem(
                name,
                i,
                f"index.parquet lists {len(rows['sample_id'])} samples of a shard the store does not hold",
                f"run `kvdistill store finalize {path}` again",
            )
        )
    # The checksums finalize recorded. A changed index.parquet whose content the checks above
    # already found wrong is reported there, once.
    index_reported = any(p.teacher is not None and "index.parquet" in p.what for p in problems) or index is None
    for what in metadata_problems(path):
        if not (what.startswith(str(path / INDEX)) and index_reported):
            problems.append(Problem(None, None, what, f"run `kvdistill store finalize {path}` again"))
    return problems


def _invalid_json(f: Path) -> str | None:
    """Why the metadata document `f` is not valid JSON (None when it is)."""
    try:
        json.loads(f.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{f}: not valid JSON ({e}; truncated or corrupt)"
    return None


def _other_metadata(path: Path) -> list[Problem]:
    """The store's metadata outside the root, the teachers' records and their shards (checked with
    them): the teachers/ and tokenizers/ groups, the recorded tokenizers and PCA projections, each
    zarr.json valid JSON and each array's data readable (zarr checks every chunk's crc32c)."""
    out = []
    for f in sorted(path.rglob("zarr.json")):
        rel = f.relative_to(path).parts
        if (
            rel[0] == PARTIAL
            or f.parent == path
            or (rel[0] == "teachers" and len(rel) > 2 and (len(rel) == 3 or rel[2].startswith("shard-")))
        ):
            continue  # being written; the root; a teacher's record and its shards: checked with them
        teacher = rel[1] if rel[0] == "teachers" and len(rel) > 3 else None
        why = _invalid_json(f)
        if why is not None:
            out.append(Problem(teacher, None, why, "restore it from a copy, or dump into a new --store"))
            continue
        if json.loads(f.read_bytes()).get("node_type") == "array":
            try:
                zarr.open_array(f.parent, mode="r")[...]
            except Exception as e:  # any codec error of a corrupt chunk is a finding
                out.append(
                    Problem(
                        teacher,
                        None,
                        f"array {f.parent} does not read ({_decode_error(e)})",
                        "restore it from a copy, or dump into a new --store",
                    )
                )
    return out


def _read_teachers(path: Path, problems: list[Problem]) -> dict[str, TeacherSpec]:
    """Every teacher's spec (layout.read_teacher_specs); a teacher whose record is damaged or
    missing is a Problem, and its shards are not checked."""
    out = {}
    for d in sorted((path / "teachers").iterdir()) if (path / "teachers").is_dir() else []:
        if not (d / "zarr.json").exists():
            continue
        fix = f"restore it from a copy, or dump teacher {d.name!r} into a new --store"
        try:
            attrs = group_attrs(d, fix)
            out[d.name] = TeacherSpec.from_dict(attrs[KEY]["teacher_spec"])
        except CorruptShard as e:
            problems.append(Problem(d.name, None, str(e).removesuffix(f"; {fix}"), fix))
        except Exception as e:  # no record, or one that is not a TeacherSpec
            problems.append(
                Problem(
                    d.name,
                    None,
                    f"{d / 'zarr.json'} holds no valid teacher record ({_decode_error(e)})",
                    f"delete {d} and dump teacher {d.name!r} again",
                )
            )
    return out


def _read_index(path: Path, problems: list[Problem]) -> dict[tuple[str, int], dict[str, np.ndarray]] | None:
    """index.parquet grouped by (teacher, shard), each group's columns in sample order."""
    fix = f"run `kvdistill store finalize {path}`"
    if not (path / INDEX).exists():
        problems.append(Problem(None, None, "not finalized: no index.parquet", fix))
        return None
    try:
        table = read_index_table(path / INDEX)
        missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
        if missing:
            problems.append(Problem(None, None, f"index.parquet lacks columns {missing}", fix + " again"))
            return None
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in INDEX_COLUMNS}
        names, code = np.unique(cols["teacher"].astype(str), return_inverse=True)
    except Exception as e:  # any decoding error of a corrupt file (pyarrow's, a non-UTF-8 string, ...) is a finding
        if isinstance(e, OSError) and e.errno is not None:  # the machine's failure (permissions, I/O), not the file's
            raise
        problems.append(Problem(None, None, index_damage(path / INDEX, e), fix + " again"))
        return None
    order = np.lexsort((cols["sample_index"], cols["shard"], code))
    key = np.stack([code[order], cols["shard"][order]])  # [2, n], sorted
    cuts = np.flatnonzero(np.any(key[:, 1:] != key[:, :-1], axis=0)) + 1
    out = {}
    for rows in np.split(order, cuts) if len(order) else []:
        r0 = rows[0]
        out[(str(names[code[r0]]), int(cols["shard"][r0]))] = {c: cols[c][rows] for c in INDEX_COLUMNS}
    return out


def _verify_shard(
    path: Path, spec: StoreSpec, tspec: TeacherSpec, i: int, problems: list[Problem]
) -> tuple[list[str], np.ndarray] | None:
    """Check one shard; return its (sample ids, offsets) when they are sound enough to compare
    with other teachers and the index."""
    name = tspec.name
    d = teacher_dir(path, name) / shard_name(i)

    def report(what: str, fix: str | None = None) -> None:
        problems.append(Problem(name, i, what, fix or _redump(name, i)))

    if spec.backend == "webdataset":
        return _verify_tar(path, spec, tspec, i, report)
    if not d.exists():
        partial = any(partial_dir(path, name).glob(f"{shard_name(i)}.*"))
        report("partial: its dump task did not finish" if partial else "missing", _redump(name, i, delete=False))
        return None
    bad = [why for f in sorted(d.rglob("zarr.json")) if (why := _invalid_json(f))]
    if bad:  # the shard's or an array's metadata: zarr would fail on it, naming no file
        for why in bad:
            report(f"metadata {why}")
        return None
    try:
        attrs = shard_attrs(d)
        group = zarr.open_group(d, mode="r")
    except Exception as e:  # any other failure to open a corrupt zarr.json is a finding
        report(f"metadata {d / 'zarr.json'} unreadable ({_decode_error(e)})")
        return None
    if not attrs or not attrs.get("complete"):
        report("incomplete (no completion record)")
        return None
    for what in shard_record_problems(attrs, spec, tspec, i):
        report(what)
    missing = [a for a in REQUIRED if a not in group]
    if missing:
        report(f"lacks arrays {missing}")
        return None
    if not all(isinstance(attrs.get(a), int) for a in ("rows", "samples")):
        report(f"completion record lacks its row / sample counts: {sorted(attrs)}")
        return None
    rows, samples = attrs["rows"], attrs["samples"]

    try:
        offsets = group["offsets"][:]  # [n + 1]
        ids = [str(s) for s in group["sample_ids"][:]]  # [n]
    except Exception as e:  # any codec error of a corrupt chunk is a finding
        report(f"offsets / sample_ids do not decode ({_decode_error(e)})")
        return None
    sound = _check_offsets(offsets, ids, rows, samples, report)

    L_s, width = spec.geometry.num_layers, tspec.width
    for a in ("input_ids", "loss_mask"):
        if group[a].shape != (rows,):
            report(f"{a} has shape {group[a].shape}, expected ({rows},) (the shard's row count)")
    for a in ("k", "v"):
        shape = group[a].shape
        # Quantised layouts may pack the last axis; the decoded shape is checked below.
        if len(shape) != 3 or shape[:2] != (rows, L_s):
            report(f"{a} has shape {shape}, expected [{rows}, {L_s}, ...] (rows, student layers)")
            sound = False

    undecodable = set()
    for a in sorted(group.array_keys()):
        gone = missing_chunks(group[a], d / a)
        if gone:
            report(f"array {a}: " + "; ".join(gone[:3]) + (f" (and {len(gone) - 3} more)" if len(gone) > 3 else ""))
            undecodable.add(a)
    for a, want in (attrs.get("crc32") or {}).items():
        if a not in group:
            report(f"array {a!r} listed in the crc32 record is missing")
            continue
        if a in undecodable:
            continue
        try:
            got = _crc32(group[a], d / a)
        except CorruptShard as e:
            report(f"{a}: {str(e).split(': ', 3)[-1]}")
            undecodable.add(a)
            continue
        except Exception as e:  # any codec error of a corrupt chunk is a finding
            report(f"{a} does not decode ({_decode_error(e)}): a corrupt or truncated chunk file")
            undecodable.add(a)
            continue
        if got != want:
            report(f"crc32 mismatch in {a}: stored data gives {got}, written as {want}")

    kv = tuple(a for a in ("k", "v") if not any(u == a or u.startswith(f"{a}_") for u in undecodable))
    if sound and kv:
        _check_values(path, name, i, rows, L_s, width, kv, _blocks(group["k"]), report)
    seg = None
    if "segment_ids" in group and "segment_ids" not in undecodable:
        seg = group["segment_ids"][:]
        if seg.shape != (rows,):
            report(f"segment_ids has shape {seg.shape}, expected ({rows},)")
            seg = None
        elif seg.size and seg.max() > 2:
            report(f"segment_ids hold {int(seg.max())}; only 0 (prompt), 1 (reasoning), 2 (answer) exist")
    if "examples" in group and "examples" not in undecodable:
        _check_examples(group["examples"], samples, report)
    if tspec.logits_top_k and not undecodable & {"logits_ids", "logits_lp"}:
        _check_logits(group, attrs, tspec.logits_top_k, rows, report)
    if tspec.latent is not None and sound and not any(u.startswith(("latent_", "codi_")) for u in undecodable):
        if "latent" not in attrs or any(a not in group for a in ("latent_k", "latent_v", "latent_mask", "latent_pos")):
            report("lacks the latent arrays its teacher spec asks for (latent_k, latent_v, latent_mask, latent_pos)")
        else:
            try:
                lat = ShardReader(path, name, i).latent(0, samples)
            except Exception as e:  # any codec error of a corrupt chunk is a finding
                report(f"latent arrays do not decode ({_decode_error(e)})")
            else:
                tokens = seg if tspec.time_map == "identity" else None
                _check_latent(
                    lat, tspec, L_s, width, samples, offsets, tokens, bool(attrs["latent"].get("hidden")), report
                )
    return (ids, offsets) if sound else None


def _check_logits(group, attrs: dict, top_k: int, rows: int, report) -> None:
    """The teacher's top-K log-probs: both arrays [rows, K] of their dtypes, ids inside the
    vocabulary (the shard record's vocab_size), log-probs finite, <= 0, descending per row."""
    missing = [a for a in ("logits_ids", "logits_lp") if a not in group]
    if missing:
        report(f"lacks {' and '.join(missing)}, which its teacher spec's logits_top_k {top_k} asks for")
        return
    ids, lp = group["logits_ids"], group["logits_lp"]
    for a, dtype in ((ids, np.int32), (lp, np.float16)):
        if a.shape != (rows, top_k) or a.dtype != dtype:
            report(f"{a.basename} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} ({rows}, {top_k})")
            return
    try:
        ids, lp = ids[:], lp[:].astype(np.float32)
    except Exception as e:  # any codec error of a corrupt chunk is a finding
        report(f"logits do not decode ({_decode_error(e)})")
        return
    vocab = (attrs.get("logits") or {}).get("vocab_size")
    if ids.size and (ids.min() < 0 or (vocab is not None and ids.max() >= vocab)):
        report(f"logits_ids hold ids outside the teacher's vocabulary [0, {vocab})")
    bad = ~np.isfinite(lp).all(axis=1) | (lp > 0).any(axis=1) | (np.diff(lp, axis=1) > 0).any(axis=1)  # [rows]
    if bad.any():
        report(
            f"logits_lp of row {int(np.flatnonzero(bad)[0])} do not descend, or are not finite log-probs <= 0 "
            f"({int(bad.sum())} such rows)"
        )


def _check_examples(arr, samples: int, report) -> None:
    """The samples' texts: one JSON {"question", "reasoning", "answer"} of strings per sample."""
    if arr.shape != (samples,):
        report(f"examples has shape {arr.shape}, expected ({samples},)")
        return
    try:
        texts = arr[:]
    except Exception as e:  # any codec error of a corrupt chunk is a finding
        report(f"examples do not decode ({_decode_error(e)})")
        return
    for j, x in enumerate(texts):
        try:
            ex = json.loads(str(x))
        except ValueError:
            ex = None
        if (
            not isinstance(ex, dict)
            or sorted(ex) != sorted(EXAMPLE_KEYS)
            or not all(isinstance(v, str) for v in ex.values())
        ):
            report(f"examples[{j}] is not a JSON object of {list(EXAMPLE_KEYS)} strings")
            return


def _check_latent(
    lat, tspec: TeacherSpec, L_s: int, width: int, samples: int, offsets, segment_ids, hidden: bool, report
) -> None:
    """Shapes, mask / position consistency, time order and finiteness of one shard's latent arrays
    (decoded, every sample). `segment_ids` (identity time map only: teacher and student grids
    agree) also checks every kept position lies in its sample's reasoning segment."""
    if samples == 0:  # an empty shard's latent arrays carry no per-sample geometry to check
        return
    M, g = tspec.latent.slots, tspec.geometry
    want = {
        "k": (samples, M, L_s, width),
        "v": (samples, M, L_s, width),
        "mask": (samples, M),
        "pos": (samples, M, g.num_layers, g.num_kv_heads),
    }
    if hidden:
        want["hidden"] = (samples, lat["hidden"].shape[-1] if "hidden" in lat else -1)
    elif tspec.latent.codi_hidden:
        report("lacks codi_hidden, which its teacher spec's latent.codi_hidden asks for")
    bad = [
        f"{a} {lat[a].shape if a in lat else 'missing'} (expected {w})"
        for a, w in want.items()
        if a not in lat or lat[a].shape != w
    ]
    if bad:
        report("latent arrays of the wrong shape: " + ", ".join(bad))
        return
    pos, mask = lat["pos"], lat["mask"]
    real = pos >= 0  # [n, M, L_t, H_t]
    wrong = ~np.all((real == mask[:, :, None, None]) & (real | (pos == -1)), axis=(1, 2, 3))  # [n]
    if wrong.any():
        report(
            "latent_mask disagrees with latent_pos >= 0, or padding positions are not -1 (first in sample"
            f" {int(np.flatnonzero(wrong)[0])})"
        )
        return
    if np.any(mask[:, 1:] & ~mask[:, :-1]):
        report("latent_mask has a padding slot before a real one; real slots come first")
    both = real[:, 1:] & real[:, :-1]
    if np.any(both & (pos[:, 1:] <= pos[:, :-1])):
        j = int(np.flatnonzero(np.any(both & (pos[:, 1:] <= pos[:, :-1]), axis=(1, 2, 3)))[0])
        report(f"latent_pos of sample {j} do not ascend in time within a (layer, head)")
    if segment_ids is not None:
        for j in range(samples):
            p = pos[j][real[j]]
            T = int(offsets[j + 1] - offsets[j])
            if p.size and (p.max() >= T or np.any(segment_ids[offsets[j] + p] != 1)):
                report(f"latent_pos of sample {j} point outside its reasoning segment")
                break
    for a in ("k", "v", "hidden"):
        if a in lat and not np.isfinite(lat[a]).all():
            report(f"latent {a} holds {int(np.count_nonzero(~np.isfinite(lat[a])))} non-finite value(s) (NaN / Inf)")


def _verify_tar(
    path: Path, spec: StoreSpec, tspec: TeacherSpec, i: int, report
) -> tuple[list[str], np.ndarray] | None:
    """A webdataset shard, read once through the readers' own check (wds_reader.tar_records): every
    member's crc32c, the records' order and count, the whole file's crc32c and size, each a
    Problem; then every sound record decoded (pickle-free): lengths, shapes, finiteness and the
    latent arrays against the completion record."""
    from .wds_reader import OLD_FIX, decode_record, latent_record, read_sidecar, tar_records

    name = tspec.name
    tar, sidecar = tar_path(path, name, i), sidecar_path(path, name, i)
    redo = _redump(name, i, delete=False)
    if not tar.exists():
        if partial_attempts(path, name, i):
            report("partial: its dump task did not finish", redo)
        elif sidecar.exists():  # its completion record is there: the tar was written, then lost
            report(f"{tar.name} is missing (deleted or lost)", redo)
        else:
            report("missing", redo)
        return None

    def problem(what: str, kind: type = CorruptShard) -> None:  # wds_reader.tar_records' findings, as Problems
        report(what, None if kind is CorruptShard else OLD_FIX)

    attrs = read_sidecar(tar, problem)
    if attrs is None:
        return None
    for what in shard_record_problems(attrs, spec, tspec, i):
        report(what)
    if not all(isinstance(attrs.get(a), int) for a in ("rows", "samples")):
        report(f"completion record lacks its row / sample counts: {sorted(attrs)}")
        return None
    ids, offsets = attrs["sample_ids"], np.asarray(attrs.get("offsets", []), dtype=np.int64)
    if not _check_offsets(offsets, ids, attrs["rows"], attrs["samples"], report):
        return None
    L_s, width = spec.geometry.num_layers, tspec.width
    latents: dict[int, dict[str, np.ndarray]] = {}
    segs: dict[int, np.ndarray | None] = {}
    for raw in tar_records(tar, problem, attrs):
        j, sid = raw["__index__"], raw["__key__"]
        try:
            s = decode_record(raw)
        except StoreError as e:
            report(str(e))
            continue
        T = int(offsets[j + 1] - offsets[j])
        k, v = s["k"], s["v"]
        if len(s["input_ids"]) != T or len(s["loss_mask"]) != T:
            report(
                f"record {j} ({sid}) has {len(s['input_ids'])} tokens / {len(s['loss_mask'])} mask entries, its"
                f" completion record {T}"
            )
            continue
        if k.shape != (T, L_s, width) or v.shape != k.shape:
            report(f"record {sid}: k {k.shape}, v {v.shape}, expected {(T, L_s, width)}")
            continue
        if not (np.isfinite(k).all() and np.isfinite(v).all()):
            report(f"record {sid}: non-finite K/V")
        if tspec.latent is not None:
            if "latent_k" not in s:
                report(f"record {sid} lacks the latent members its teacher spec asks for")
                continue
            latents[j] = latent_record(s)
            segs[j] = s.get("segment_ids")
    if tspec.latent is not None and len(latents) == len(ids) and latents:
        hidden = all("hidden" in x for x in latents.values())
        lat = {
            a: np.stack([latents[j][a] for j in range(len(ids))])
            for a in ("k", "v", "mask", "pos", *(("hidden",) if hidden else ()))
        }
        seg = (
            np.concatenate([segs[j] for j in range(len(ids))])
            if tspec.time_map == "identity" and all(x is not None for x in segs.values())
            else None
        )
        _check_latent(lat, tspec, L_s, width, len(ids), offsets, seg, hidden, report)
    return ids, offsets


def _check_offsets(offsets: np.ndarray, ids: list[str], rows: int, samples: int, report) -> bool:
    sound = True
    if len(offsets) != samples + 1:
        report(f"offsets has {len(offsets)} entries, expected samples + 1 = {samples + 1}")
        sound = False
    elif len(offsets) and (offsets[0] != 0 or offsets[-1] != rows):
        report(f"offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to rows = {rows}")
        sound = False
    if len(offsets) > 1 and np.any(np.diff(offsets) < 0):
        j = int(np.flatnonzero(np.diff(offsets) < 0)[0])
        report(f"offsets decrease at sample {j}: {offsets[j]} -> {offsets[j + 1]}")
        sound = False
    if len(ids) != samples:
        report(f"sample_ids has {len(ids)} entries, expected {samples}")
        sound = False
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = sorted({s for s in ids if s in seen or seen.add(s)})
        report(f"sample ids repeat: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
        sound = False
    return sound


def _check_values(path, name, i, rows, L_s, width, kv, step, report) -> None:
    """Decoded K/V: shape [rows, L_s, width] and finite, read in blocks through ShardReader."""
    try:
        reader = ShardReader(path, name, i)
        bad = dict.fromkeys(kv, 0)
        first_bad: dict[str, int] = {}
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = reader.rows(start, stop, kv)
            for a in kv:
                x = block[a]  # [stop - start, L_s, width]
                if x.shape != (stop - start, L_s, width):
                    report(
                        f"{a} decodes to rows of shape {x.shape[1:]}, expected ({L_s}, {width}) (student layers,"
                        " teacher width)"
                    )
                    return
                nonfinite = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)  # [rows]
                if nonfinite.any():
                    bad[a] += int(np.count_nonzero(~np.isfinite(x)))
                    first_bad.setdefault(a, start + int(np.flatnonzero(nonfinite)[0]))
    except Exception as e:  # any codec error of a corrupt chunk is a finding
        report(f"{'/'.join(kv)} do not decode ({_decode_error(e)}): a corrupt or truncated chunk file")
        return
    for a, n in bad.items():
        if n:
            report(f"{a} holds {n} non-finite value(s) (NaN / Inf), the first in row {first_bad[a]}")


def _compare_teachers(name, i, ids, offsets, ref, problems: list[Problem]) -> None:
    ref_name, ref_ids, ref_offsets = ref
    fix = (
        f"every teacher must be dumped from the same data, split, num_shards and student tokenizer; {_redump(name, i)}"
    )
    if ids != ref_ids:
        j = next(
            (j for j, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b), min(len(ids), len(ref_ids))
        )
        problems.append(
            Problem(
                name,
                i,
                f"holds other sample ids than teacher {ref_name!r} ({len(ids)} vs {len(ref_ids)} "
                f"samples, first difference at sample {j})",
                fix,
            )
        )
    elif not np.array_equal(offsets, ref_offsets):
        j = int(np.flatnonzero(offsets != ref_offsets)[0])
        problems.append(
            Problem(
                name,
                i,
                f"holds the samples of teacher {ref_name!r} with other lengths (offset {j}: "
                f"{offsets[j]} vs {ref_offsets[j]})",
                fix,
            )
        )


def _compare_index(name, i, ids, offsets, rows, problems: list[Problem]) -> None:
    fix = "run `kvdistill store finalize` again (it rewrites index.parquet from the shards)"
    if rows is None:
        if ids:  # an empty shard has no rows in the index, rightly
            problems.append(Problem(name, i, "index.parquet has no rows for this shard", fix))
        return
    want = {
        "sample_id": np.asarray(ids, dtype=object),
        "sample_index": np.arange(len(ids)),
        "row_start": offsets[:-1],
        "row_stop": offsets[1:],
        "length": np.diff(offsets),
    }
    if len(rows["sample_id"]) != len(ids):
        problems.append(
            Problem(name, i, f"index.parquet lists {len(rows['sample_id'])} samples, the shard holds {len(ids)}", fix)
        )
        return
    for c, w in want.items():
        have = rows[c].astype(str) if c == "sample_id" else rows[c]
        diff = np.flatnonzero(have != (w.astype(str) if c == "sample_id" else w))
        if len(diff):
            j = int(diff[0])
            problems.append(
                Problem(
                    name,
                    i,
                    f"index.parquet disagrees with the shard on {c} at {len(diff)} sample(s), "
                    f"first sample {j} ({ids[j]!r}): index has {have[j]!r}, shard has {w[j]!r}",
                    fix,
                )
            )


def _extra_shards(path: Path, name: str, num_shards: int) -> list[Problem]:
    tdir = teacher_dir(path, name)
    out = []
    for d in sorted(tdir.glob("shard-*")):
        suffix = d.name.removeprefix("shard-").removesuffix(".tar").removesuffix(".json")  # webdataset shards
        if not (suffix.isdigit() and int(suffix) < num_shards):
            out.append(
                Problem(
                    name,
                    None,
                    f"{d.name} lies beyond the store's {num_shards} shards",
                    f"delete {d} (left by a run with another --num-shards)",
                )
            )
    return out


def format_problems(problems: list[Problem]) -> str:
    lines = [f"{len(problems)} problem(s):"]
    for p in problems:
        lines.append(f"  {p.where}: {p.what}")
        lines.append(f"      fix: {p.fix}")
    return "\n".join(lines)
