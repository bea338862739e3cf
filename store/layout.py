"""The store's names and metadata, for both backends: paths of teachers, shards, tars and their
completion records, the `.partial/` folder, the attribute key, the index schema; reading and
writing the store and teacher specs. Every other module (and every tool outside the store)
takes its names from here.

Layout (self-describing: plain `zarr.open_group` and `pyarrow.parquet` read all of it):

    OUT/                            attrs["kvdistill"] = {schema_version, store_spec}
      teachers/<name>/              attrs["kvdistill"] = {teacher_spec}
        shard-00000/                zarr backend (store/writer.py): attrs["kvdistill"] = {complete,
                                    samples, rows, crc32, ...}
          k, v        [N, L_s, D_t] K/V on the student's token grid, all samples concatenated
          input_ids   [N] int32     the student's tokens (the grid k and v are aligned to)
          loss_mask   [N] bool      reasoning + answer tokens
          segment_ids [N] uint8     0 prompt, 1 reasoning, 2 answer (core.prompts.SEGMENTS)
          offsets     [n + 1] int64 sample j is rows offsets[j]:offsets[j+1]
          sample_ids  [n] str
          latent_k, latent_v [n, M, L_s, D_t]  KaVa latent mode only (teacher spec `latent`): per
                                    sample, the teacher's R-KV compressed reasoning K/V
                                    (align/rkv.py), layer-mapped like k / v
          latent_mask [n, M] bool   False = padding slot (a chain shorter than M)
          latent_pos  [n, M, L_t, H_t] int32  kept teacher positions per teacher layer and
                                    KV head, ascending; -1 = padding
          codi_hidden [n, H_t] float32  teacher's final-norm hidden state before the answer
          logits_ids  [N, K] int32  teacher spec `logits_top_k` = K > 0 only: per row, the K most
                                    likely next tokens of the teacher (student = teacher vocabulary),
                                    descending, at the teacher position the row is aligned to
          logits_lp   [N, K] float16  their log-probs (log_softmax at temperature 1 over the full
                                    vocabulary; the tail mass is 1 - sum(exp(lp)))
          examples    [n] str       per sample, JSON {"question", "reasoning", "answer"}: the
                                    text the dump rendered with each side's prompt template
                                    (absent in stores written before kvdistill recorded it)
        shard-00000.tar, shard-00000.json   webdataset backend (store/wds_writer.py): the records and
                                    their completion record
      tokenizers/student/           the tokenizers the dump tokenized with, one zarr array of
      tokenizers/teachers/<name>/   bytes per file (tokenizer.json, ...); attrs["kvdistill"] =
                                    {tokenizer: {fingerprint, files}} (absent in older stores)
      .partial/<teacher>/           shards being written and their lock files (store/writer.py)
      index.parquet                 written by `finalize` (store/index.py)

With the sample's text and both tokenizers a reader rebuilds exactly the time map a sample was
aligned with (`kvdistill store show-alignment`), without the teacher's weights.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kvdistill.schemas import SCHEMA_VERSION, StoreSpec, TeacherSpec

from .errors import CorruptShard, StoreError
from .lock import FileLock, lock_holder

__all__ = [
    "KEY",
    "INDEX",
    "INDEX_SCHEMA",
    "INDEX_COLUMNS",
    "PARTIAL",
    "shard_name",
    "teacher_dir",
    "tar_path",
    "sidecar_path",
    "partial_dir",
    "partial_attempts",
    "lock_path",
    "group_attrs",
    "init_store",
    "init_teacher",
    "read_store_spec",
    "read_teacher_specs",
    "is_wds_store",
    "shard_attrs",
    "shard_is_complete",
    "shard_record_problems",
    "store_spec_differences",
    "teacher_spec_differences",
    "disk_usage",
    "TOKENIZERS",
    "tokenizer_dir",
    "init_tokenizer",
    "read_tokenizer",
]

KEY = "kvdistill"  # the attribute (zarr.json) every kvdistill record sits under
INDEX = "index.parquet"
INDEX_SCHEMA = pa.schema(
    [
        ("teacher", pa.string()),
        ("shard", pa.int64()),
        ("sample_id", pa.string()),
        ("sample_index", pa.int64()),
        ("row_start", pa.int64()),
        ("row_stop", pa.int64()),
        ("length", pa.int64()),
    ]
)
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)
PARTIAL = ".partial"  # inside the store: shards being written, their locks, the metadata lock
TOKENIZERS = "tokenizers"  # the dump's tokenizers, their files as zarr byte arrays


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def teacher_dir(path: str | Path, teacher: str) -> Path:
    return Path(path) / "teachers" / teacher


def tar_path(path: str | Path, teacher: str, shard: int) -> Path:
    """A webdataset shard's tar."""
    return teacher_dir(path, teacher) / f"{shard_name(shard)}.tar"


def sidecar_path(path: str | Path, teacher: str, shard: int) -> Path:
    """A webdataset shard's completion record, beside its tar."""
    return teacher_dir(path, teacher) / f"{shard_name(shard)}.json"


def partial_dir(path: str | Path, teacher: str) -> Path:
    """Where shards of `teacher` are written before they are complete (and their lock files)."""
    return Path(path).absolute() / PARTIAL / teacher


def partial_attempts(path: str | Path, teacher: str, shard: int) -> list[Path]:
    """Unfinished attempts at a shard (a killed task's, or one still running), not its lock file."""
    return sorted(p for p in partial_dir(path, teacher).glob(f"{shard_name(shard)}.*") if p.suffix != ".lock")


def lock_path(path: str | Path, teacher: str, shard: int) -> Path:
    """The lock file whose holder is the one writer of (teacher, shard) (store/writer.py)."""
    return partial_dir(path, teacher) / f"{shard_name(shard)}.lock"


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: store has {a!r}, this run has {b!r}")
    return out


# Fields of StoreSpec that must agree between every task writing into one store. The student's
# path may differ (a moved checkpoint); its geometry, tokenizer and prompt template may not.
_STORE_KEYS = (
    "schema_version",
    "geometry",
    "tokenizer_fingerprint",
    "data_fingerprint",
    "num_shards",
    "kv_dtype",
    "teacher_kv_dtype",
    "backend",
)


def _spec_fields(spec: dict) -> dict:
    """The fields of a StoreSpec (as a dict) every task writing into one store must share."""
    return {
        **{k: spec.get(k) for k in _STORE_KEYS},
        "student": {"prompt_template": (spec.get("student") or {}).get("prompt_template")},
    }


def store_spec_differences(path: str | Path, spec: StoreSpec) -> list[str]:
    """What differs between the store's recorded spec and `spec`, one `field: store has ..., this
    run has ...` each ([] when they agree, or when there is no store yet); reads, never writes."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        return []
    have = group_attrs(path, "restore the store's root metadata from a copy, or dump into a new --store").get(KEY)
    if have is None:
        return []
    # Through StoreSpec: a field recorded by an older kvdistill compares as its default.
    old = StoreSpec.from_dict(have["store_spec"]).to_dict()
    return _diff(_spec_fields(old), _spec_fields(spec.to_dict()))


def teacher_spec_differences(path: str | Path, spec: TeacherSpec) -> list[str]:
    """What differs between teacher `spec.name`'s recorded spec in the store and `spec` where it
    matters for its shards (its fingerprint and layer map); [] when they agree or it has none."""
    group = teacher_dir(path, spec.name)
    if not (group / "zarr.json").exists():
        return []
    have = group_attrs(group, f"restore it from a copy, or dump teacher {spec.name!r} into a new --store").get(KEY)
    if have is None:
        return []
    old = TeacherSpec.from_dict(have["teacher_spec"])
    if old.fingerprint == spec.fingerprint and old.layer_map == spec.layer_map:
        return []
    return _diff(old.to_dict(), spec.to_dict())


def shard_record_problems(attrs: dict, spec: StoreSpec, tspec: TeacherSpec, shard: int) -> list[str]:
    """What is wrong with a complete shard's record (`shard_attrs`) of teacher `tspec.name` at
    place `shard`, against the store's and the teacher's specs: it holds another teacher's or
    shard's data, or was written by another teacher setup, from other data, with another codec or
    width (stale). The checks `store verify`, `finalize`, the trainer and a re-run dump share;
    [] when sound. A field an older kvdistill did not record is not checked."""
    name, out = tspec.name, []
    if attrs.get("teacher", name) != name or attrs.get("shard", shard) != shard:
        out.append(f"holds {shard_name(attrs.get('shard', shard))} of teacher {attrs.get('teacher')!r}, not this one")
    if attrs.get("fingerprint") not in (None, tspec.fingerprint):
        out.append(
            f"stale: written by another teacher setup (fingerprint {attrs['fingerprint']}, teacher spec has"
            f" {tspec.fingerprint})"
        )
    if attrs.get("data_fingerprint") not in (None, spec.data_fingerprint):
        out.append(
            f"stale: written from other data (data fingerprint {attrs['data_fingerprint']}, store has"
            f" {spec.data_fingerprint})"
        )
    if attrs.get("codec") not in (None, tspec.kv_dtype):
        out.append(f"stale: K/V stored as {attrs['codec']}, the teacher's codec is {tspec.kv_dtype}")
    if attrs.get("width") not in (None, tspec.width):
        out.append(f"K/V width {attrs['width']} in its record, the teacher spec says {tspec.width}")
    top_k = (attrs.get("logits") or {}).get("top_k", 0)
    if top_k != tspec.logits_top_k:
        out.append(f"stale: holds top-{top_k} logits, the teacher spec says top-{tspec.logits_top_k} (0: none)")
    return out


@contextmanager
def _metadata_lock(path: Path):
    """Serialise metadata creation between the array tasks that start together (they would
    otherwise race to create the same zarr groups). An flock inside the store (store/lock.py)."""
    lock = FileLock(
        Path(path).absolute() / PARTIAL / "metadata.lock",
        f"metadata of store {path}",
        on_busy="wait",
        poll=0.05,
        quiet=True,
    )
    with lock:
        yield
    with suppress(OSError):  # not empty: a shard is being written
        lock.path.parent.rmdir()  # .partial/


def init_store(path: str | Path, spec: StoreSpec) -> None:
    """Create the store root with its spec, or check that an existing store agrees with it."""
    with _metadata_lock(Path(path)):
        _init_store(Path(path), spec)


def _init_store(path: Path, spec: StoreSpec) -> None:
    root = zarr.open_group(path, mode="a")
    have = root.attrs.get(KEY)
    if have is None:
        root.attrs[KEY] = {"schema_version": SCHEMA_VERSION, "store_spec": spec.to_dict()}
        zarr.open_group(path / "teachers", mode="a")
        return
    problems = store_spec_differences(path, spec)
    if problems and not _holds_shards(path):
        # Nothing was ever committed (e.g. a first run failed after creating the metadata): the
        # metadata describes no data, so a corrected run may replace it.
        shutil.rmtree(path / "teachers", ignore_errors=True)
        root.attrs[KEY] = {"schema_version": SCHEMA_VERSION, "store_spec": spec.to_dict()}
        zarr.open_group(path / "teachers", mode="a")
        return
    if problems:
        raise StoreError(
            f"store {path} was built for another student / data set / layout:\n  "
            + "\n  ".join(problems)
            + "\nwrite into a new --store, or run with the settings the store was built with "
            "(a store with no complete shard yet is re-initialised by the next run)"
        )


def _holds_shards(path: Path, teacher: str = "*") -> bool:
    """Any complete shard of any teacher (or of `teacher`), or any shard being written (its lock held)?"""
    if any(p.name.startswith("shard-") for p in (path / "teachers").glob(f"{teacher}/*")):
        return True
    # A live writer: its shard would land in a store re-made under it.
    return any(lock_holder(f) is not None for f in (path.absolute() / PARTIAL).glob(f"{teacher}/shard-*.lock"))


def init_teacher(path: str | Path, spec: TeacherSpec, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Create teachers/<name> with its spec (and `arrays`, e.g. the PCA projection the K/V were
    reduced with, as teachers/<name>/projection/<array>), or check the existing one agrees."""
    with _metadata_lock(Path(path)):
        _init_teacher(Path(path), spec, arrays)


def _init_teacher(path: Path, spec: TeacherSpec, arrays: dict[str, np.ndarray] | None) -> None:
    group = zarr.open_group(teacher_dir(path, spec.name), mode="a")
    have = group.attrs.get(KEY)
    if have is None:
        if arrays:
            proj = group.require_group("projection")
            for key, arr in arrays.items():
                proj.create_array(key, data=np.asarray(arr), overwrite=True)
        group.attrs[KEY] = {"teacher_spec": spec.to_dict()}  # last: marks the group as initialised
        return
    problems = teacher_spec_differences(path, spec)
    if problems and not _holds_shards(path, spec.name):
        shutil.rmtree(teacher_dir(path, spec.name))  # no shard of it was ever committed: its spec describes no data
        return _init_teacher(path, spec, arrays)
    if problems:
        raise StoreError(
            f"store {path}: teacher {spec.name!r} already holds shards of another teacher setup:\n  "
            + "\n  ".join(problems)
            + "\ngive this teacher another name (--teacher-name) or use a new --store (a teacher with no complete"
            " shard "
            "yet is re-initialised by the next run)"
        )


def group_attrs(group_dir: Path, fix: str) -> dict:
    """The attributes in a zarr group's zarr.json, read directly; a file that is not valid JSON
    (truncated, overwritten) is CorruptShard naming it, with `fix`."""
    f = Path(group_dir) / "zarr.json"
    try:
        meta = json.loads(f.read_text())
    except UnicodeDecodeError as e:
        raise CorruptShard(f"{f}: not valid JSON (undecodable bytes at {e.start}; corrupt); {fix}") from e
    except json.JSONDecodeError as e:
        raise CorruptShard(
            f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated or corrupt); {fix}"
        ) from e
    if not isinstance(meta, dict) or not isinstance(meta.get("attributes", {}), dict):
        raise CorruptShard(f"{f}: not a zarr v3 metadata document; {fix}")
    return meta.get("attributes", {})


def read_store_spec(path: str | Path) -> StoreSpec:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a kvdistill store (no zarr.json); run `kvdistill dump` first")
    have = group_attrs(path, "restore the store's root metadata from a copy, or dump into a new --store").get(KEY)
    if have is None:
        raise StoreError(f"{path} is a zarr group but not a kvdistill store (no '{KEY}' attribute)")
    if have["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema version {have['schema_version']}, this kvdistill reads "
            f"version {SCHEMA_VERSION}; re-dump or install the matching kvdistill"
        )
    return StoreSpec.from_dict(have["store_spec"])


def read_teacher_specs(path: str | Path) -> dict[str, TeacherSpec]:
    tdir = Path(path) / "teachers"
    out = {}
    for d in sorted(tdir.iterdir()) if tdir.exists() else []:
        if (d / "zarr.json").exists():
            attrs = group_attrs(d, f"restore it from a copy, or dump teacher {d.name!r} into a new --store")
            if KEY not in attrs:
                raise StoreError(
                    f"{d / 'zarr.json'}: teacher {d.name!r} has no '{KEY}' record (not initialised); delete {d} and"
                    " dump it again"
                )
            out[d.name] = TeacherSpec.from_dict(attrs[KEY]["teacher_spec"])
    return out


def shard_attrs(path: Path) -> dict | None:
    """The completion record of a shard: zarr attrs, or the JSON beside a webdataset tar."""
    fix = (
        f"delete {path.name} of teacher {path.parent.name!r} and re-run its dump task, then `kvdistill store finalize`"
    )
    if (path / "zarr.json").exists():  # the group's zarr v3 metadata document, read directly (no zarr round trip)
        return group_attrs(path, fix).get(KEY)
    tar, sidecar = path.with_name(path.name + ".tar"), path.with_name(path.name + ".json")
    if tar.exists() and sidecar.exists():
        try:
            return json.loads(sidecar.read_text())
        except ValueError as e:
            raise CorruptShard(f"{sidecar}: the shard's completion record is not valid JSON ({e}); {fix}") from e
    return None


def shard_is_complete(path: str | Path, teacher: str, shard: int) -> bool:
    """Either backend: a zarr shard group, or a tar with its completion record."""
    attrs = shard_attrs(teacher_dir(path, teacher) / shard_name(shard))
    return bool(attrs and attrs.get("complete"))


def is_wds_store(path: str | Path) -> bool:
    return (Path(path) / "zarr.json").exists() and read_store_spec(path).backend == "webdataset"


def disk_usage(path: str | Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- the dump's tokenizers -------------------------------------------------------------------------


def tokenizer_dir(path: str | Path, teacher: str | None = None) -> Path:
    """The group holding the student's tokenizer (teacher None) or teacher `teacher`'s."""
    return Path(path) / TOKENIZERS / ("student" if teacher is None else f"teachers/{teacher}")


def init_tokenizer(path: str | Path, files: dict[str, bytes], fingerprint: str, teacher: str | None = None) -> None:
    """Record the files of a tokenizer the dump used (`save_pretrained`'s output, read back as
    bytes), so the store alone can tokenize a sample's text again; the store itself never loads
    them. A record of the same fingerprint is kept; another one replaces it unless the teacher
    already holds shards (they were tokenized by the recorded one)."""
    with _metadata_lock(Path(path)):
        _init_tokenizer(Path(path), files, fingerprint, teacher)


def _init_tokenizer(path: Path, files: dict[str, bytes], fingerprint: str, teacher: str | None) -> None:
    where = tokenizer_dir(path, teacher)
    have = read_tokenizer(path, teacher, files=False)
    if have is not None and have[1] == fingerprint:
        return
    if have is not None and teacher is not None and _holds_shards(path, teacher):
        raise StoreError(
            f"store {path}: teacher {teacher!r} holds shards tokenized by another tokenizer (fingerprint {have[1]}, "
            f"this run's {fingerprint}); give this teacher another name (--teacher-name) or use a new --store"
        )
    # (the student's fingerprint was checked against the store's by init_store)
    for d in [path / TOKENIZERS, *([path / TOKENIZERS / "teachers"] if teacher is not None else [])]:
        zarr.open_group(d, mode="a")  # real parent groups: zarr tools walk the tree without warnings
    group = zarr.open_group(where, mode="w")  # replaces another or an incomplete record
    for name, data in sorted(files.items()):
        group.create_array(
            name, data=np.frombuffer(data, dtype=np.uint8), compressors=[ZstdCodec(level=3), Crc32cCodec()]
        )
    group.attrs[KEY] = {"tokenizer": {"fingerprint": fingerprint, "files": sorted(files)}}  # last: marks it complete


def read_tokenizer(
    path: str | Path, teacher: str | None = None, files: bool = True
) -> tuple[dict[str, bytes], str] | None:
    """({file name: bytes}, fingerprint) of a recorded tokenizer (the student's for teacher
    None), or None if the store has no complete record of it (written before kvdistill recorded
    tokenizers). files=False: the fingerprint only ({} for the files)."""
    where = tokenizer_dir(path, teacher)
    if not (where / "zarr.json").exists():
        return None
    rec = group_attrs(
        where, f"delete {where} and dump {'the student' if teacher is None else repr(teacher)} again"
    ).get(KEY)
    if not rec:
        return None
    tok = rec["tokenizer"]
    if not files:
        return {}, tok["fingerprint"]
    group = zarr.open_group(where, mode="r")
    return {name: group[name][:].tobytes() for name in tok["files"]}, tok["fingerprint"]
