"""Reading a webdataset shard, every byte checked: one tar's records (`tar_records`), decoded
(`decode_record`), every teacher zipped: one shard's records as stored (`wds_samples`: convert,
tools), the trainer's samples of many shards (`tar_samples`, through backend.shard_samples) and
one sample (`tar_sample`, through backend.read_sample). store/wds_writer.py writes the tars and
their completion records (the layout is in its docstring).

Integrity: nothing corrupt is read as data. Every reader (the ones above, convert, verify) reads
a tar through `tar_records`, which checks

- each member's crc32c against the completion record before anything decodes it;
- that the records arrive in the recorded order with the recorded members, and that the tar
  holds all of them: Python's tarfile ends an archive silently at a damaged header, so a
  damaged or truncated tar would otherwise just end early;
- the crc32c and size of the whole file, computed from the very bytes tarfile reads (the
  file object is wrapped) plus the rest after the end-of-archive marker, when the tar has been
  read to its end: a flipped byte in a header, padding or the end blocks is refused too.

Each failure is a one-line CorruptShard naming store, teacher, shard, member and tar (a missing
tar: "missing (deleted or lost)"). Checked records are decoded with `np.load(...,
allow_pickle=False)` only: an object-dtype array (which would need pickle) or any other member
is refused.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .errors import CorruptShard, StoreError
from .layout import shard_name, tar_path
from .reader import read_index
from .samples import check_latent_sample, contract_latent, kept_per_shard

__all__ = [
    "tar_records",
    "read_sidecar",
    "decode_record",
    "latent_record",
    "wds_samples",
    "tar_samples",
    "tar_sample",
    "file_crc32c",
    "OLD_FIX",
]

ARRAYS = ("k", "v", "input_ids", "loss_mask")
OPTIONAL = (
    "segment_ids",
    "latent_k",
    "latent_v",
    "latent_mask",
    "latent_pos",
    "codi_hidden",
)  # members only some shards hold
_BLOCK = 1 << 24  # bytes per read when checksumming a whole file

OnProblem = Callable[..., None]  # problem(what, kind=CorruptShard): raise (readers) or record (verify)
OLD_FIX = "re-dump this teacher into a new store (or convert its zarr store again) with this kvdistill"

# What Python's tarfile raises on bytes that are not a well-formed tar (a damaged first header,
# data cut short, a header that claims a compression it does not have).
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)


class _Crc32cReader:
    """The tar's file object as webdataset's tar reader sees it: every byte read goes into a
    running crc32c and a byte count, so the whole-file checksum costs no second pass."""

    def __init__(self, f, name: str) -> None:
        self.f, self.name, self.crc, self.size = f, name, 0, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.crc = google_crc32c.extend(self.crc, b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        """Read what tarfile left: the rest of the end-of-archive blocks (and anything after)."""
        while self.read(_BLOCK):
            pass


def file_crc32c(path: Path) -> tuple[int, int]:
    """(crc32c, bytes) of a whole file, computed as tar_records computes it while it streams."""
    with path.open("rb") as f:
        stream = _Crc32cReader(f, str(path))
        stream.drain()
    return stream.crc, stream.size


def _where(tar: Path) -> str:
    """'store S: teacher 'T' shard-00003' for S/teachers/T/shard-00003.tar."""
    return f"store {tar.parent.parent.parent}: teacher {tar.parent.name!r} {tar.stem}"


def _refuse(tar: Path) -> OnProblem:
    """The readers' problem(): one line naming store, teacher, shard, what, and the fix."""

    def problem(what: str, kind: type[StoreError] = CorruptShard) -> None:
        fix = "re-dump this shard (`kvdistill store verify` names the command)" if kind is CorruptShard else OLD_FIX
        raise kind(f"{_where(tar)}: {what}; {fix}")

    return problem


def read_sidecar(tar: Path, problem: OnProblem) -> dict[str, Any] | None:
    """The completion record of `tar`, with its checksums in a usable shape, or None (reported)."""
    sidecar = tar.with_suffix(".json")
    try:
        attrs = json.loads(sidecar.read_text())
    except FileNotFoundError:
        problem(f"completion record {sidecar} is missing (deleted or lost)")
        return None
    except (OSError, ValueError) as e:
        problem(f"completion record {sidecar} is unreadable ({type(e).__name__}: {e})")
        return None
    sums = attrs.get("crc32c") if isinstance(attrs, dict) else None
    if sums is None:
        problem(
            f"{tar.name} was written by an older kvdistill, without per-record checksums, so it cannot be checked"
            " while it streams",
            StoreError,
        )
        return None
    ids = attrs.get("sample_ids")
    if (
        not isinstance(sums, dict)
        or not isinstance(ids, list)
        or not all(isinstance(sums.get(a), int) for a in ("tar", "size"))
        or not isinstance(sums.get("members"), list)
        or not isinstance(sums.get("records"), list)
        or len(sums["records"]) != len(ids)
        or any(not isinstance(r, list) or len(r) != len(sums["members"]) for r in sums["records"])
    ):
        problem(f"completion record {sidecar} has malformed sample ids / checksums")
        return None
    return attrs


def tar_records(
    tar: str | Path, problem: OnProblem | None = None, attrs: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The records of one shard's tar, each checked before it is yielded: {"__key__": sample id,
    "__url__": the tar, "__index__": its position, "<member>": bytes}. Every problem (see the
    module docstring) goes to `problem(what, kind)`: by default it raises one line naming store,
    teacher, shard and the fix (CorruptShard; StoreError for a tar written without checksums).
    verify records it and reads on where it can (a record with a bad member is skipped, a tar
    that no longer parses ends the scan, the whole-file checksum is always checked).
    `attrs`: the completion record, if read already."""
    tar = Path(tar)
    problem = problem or _refuse(tar)
    attrs = attrs if attrs is not None else read_sidecar(tar, problem)
    if attrs is None:
        return
    ids, sums = attrs["sample_ids"], attrs["crc32c"]
    members, crcs, n = sums["members"], sums["records"], len(attrs["sample_ids"])
    slot = {m: c for c, m in enumerate(members)}
    try:
        f = tar.open("rb")
    except FileNotFoundError:
        problem(f"tar {tar} is missing (deleted or lost)")
        return
    with f:
        stream = _Crc32cReader(f, str(tar))
        files = tar_file_iterator(stream)  # webdataset's streaming reader of tar members
        j, record, sound = 0, None, True  # records complete so far, the one being read, no structural damage

        def damaged(what: str) -> None:
            nonlocal sound
            sound = False
            problem(f"tar {tar} {what}")

        while True:
            try:
                item = next(files, None)
            except _TAR_ERRORS as e:
                damaged(f"does not parse after {j} of {n} records ({type(e).__name__}: {str(e).split(' @ ')[0]})")
                break
            if item is None:
                break
            key, suffix = base_plus_ext(item["fname"])
            if record is None:
                if j >= n or key != ids[j]:
                    damaged(
                        f"holds record {key!r} where its completion record lists "
                        + (f"{ids[j]!r} (record {j} of {n})" if j < n else f"only {n} records")
                    )
                    break
                record, good = {"__key__": key, "__url__": str(tar), "__index__": j}, True
            if key != record["__key__"] or suffix not in slot or suffix in record:
                damaged(
                    f"holds member {item['fname']!r} where record {j} ({ids[j]!r}) of {n} should have members"
                    f" {members}"
                )
                break
            data = item["data"]
            got, want = google_crc32c.value(data), crcs[j][slot[suffix]]
            if got != want:
                good = False
                problem(f"member {key}.{suffix} of {tar} fails its crc32c ({got:08x}, written as {want:08x})")
            record[suffix] = data
            if len(record) - 3 == len(members):
                j += 1
                if good:
                    yield record
                record = None
        if sound and record is not None:
            damaged(
                f"ends inside record {j} ({ids[j]!r}) of {n}: it has members"
                f" {sorted(k for k in record if not k.startswith('__'))} of {members}"
            )
        elif sound and j != n:
            damaged(f"ends after {j} of {n} records (truncated, or a damaged header ended it early)")
        try:
            stream.drain()
        except OSError as e:
            problem(f"tar {tar} cannot be read to its end ({e})")
            return
    if (stream.crc, stream.size) != (sums["tar"], sums["size"]):
        problem(
            f"tar {tar} fails its whole-file crc32c: {stream.size} bytes with crc32c {stream.crc:08x}, written as"
            f" {sums['size']} bytes with {sums['tar']:08x} (a damaged header, padding or end block, or a changed file)"
        )


def decode_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A checked record's arrays: only our members, only pickle-free npy."""
    out: dict[str, Any] = {"sample_id": sample["__key__"], "url": sample.get("__url__")}
    unknown = sorted(
        k for k in sample if not k.startswith("__") and k not in {f"{a}.npy" for a in ARRAYS + OPTIONAL} | {"json"}
    )
    if unknown:
        raise StoreError(f"{sample.get('__url__')}: record {sample['__key__']} has unexpected members {unknown}")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise StoreError(f"{sample.get('__url__')}: {sample['__key__']}.json is not valid JSON ({e})") from e
        if isinstance(meta, dict) and meta.get("example") is not None:
            out["example"] = meta["example"]
    for name in ARRAYS + tuple(a for a in OPTIONAL if f"{a}.npy" in sample):
        try:
            out[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refused
            raise StoreError(
                f"{sample.get('__url__')}: {sample['__key__']}.{name}.npy cannot be read without pickle ({e});"
                " refusing it"
            ) from e
    return out


def latent_record(r: dict[str, Any]) -> dict[str, np.ndarray]:
    """One sample's latent members in the stream's form: k, v float32 [M, L, D], mask, pos, hidden."""
    out = {
        "k": r["latent_k"].astype(np.float32),
        "v": r["latent_v"].astype(np.float32),
        "mask": r["latent_mask"],
        "pos": r["latent_pos"],
    }
    if "codi_hidden" in r:
        out["hidden"] = r["codi_hidden"]
    return out


def _zip(teachers: list[str], streams: list[Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The teachers' decoded records of one shard, zipped by position, in the trainer's sample
    format (sample_id, shard, input_ids, loss_mask, kv, and segment_ids / latent when stored)."""
    for records in zip(*streams, strict=True):
        ids = {r["sample_id"] for r in records}
        shard = int(Path(records[0]["url"]).stem.removeprefix("shard-"))
        if len(ids) != 1:
            raise StoreError(
                f"{shard_name(shard)}: teachers {teachers} hold other samples at one position ({sorted(ids)})"
            )
        head = records[0]
        out = {
            "sample_id": head["sample_id"],
            "shard": shard,
            "input_ids": head["input_ids"],
            "loss_mask": head["loss_mask"],
            "kv": {t: (r["k"], r["v"]) for t, r in zip(teachers, records, strict=True)},
        }
        if "segment_ids" in head:
            out["segment_ids"] = head["segment_ids"]
        if "example" in head:
            out["example"] = head["example"]
        latent = {t: latent_record(r) for t, r in zip(teachers, records, strict=True) if "latent_k" in r}
        if latent:
            out["latent"] = latent
        yield out


def _records(root: Path, teacher: str, shard: int) -> Iterator[dict[str, Any]]:
    """One teacher's decoded records of one shard, in order, the tar checked."""
    for record in tar_records(tar_path(root, teacher, shard)):
        yield decode_record(record)


def wds_samples(root: str | Path, teachers: list[str], shard: int) -> Iterator[dict[str, Any]]:
    """The samples of one shard as stored, every teacher zipped (with "example" and the latent
    records' "pos" where stored: for convert and tools); every tar checked as it streams
    (tar_records: CorruptShard on any damage)."""
    return _zip(teachers, [_records(Path(root), t, shard) for t in teachers])


def tar_samples(
    store: str | Path,
    teachers: list[str],
    shards: list[int],
    *,
    read_latent: bool = False,
    keep: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of `shards`, in this order, in the trainer's form (backend.shard_samples
    documents it): latent records only with read_latent. keep: only the samples at these sorted
    positions of the sequence (index.parquet's counts place them), as zarr_samples does; a tar
    holding none of them is not read, the others stream whole, checked, and their other samples
    are dropped."""
    store = Path(store)
    if keep is None:
        wanted = [(s, None) for s in shards]
    else:
        index = read_index(store, teachers[:1])
        wanted = kept_per_shard(shards, keep, index, teachers[0])
    for shard, want in wanted:
        mine = None if want is None else set(want.tolist())
        for j, sample in enumerate(wds_samples(store, teachers, shard)):
            if mine is not None and j not in mine:
                continue
            sample.pop("example", None)  # the sample's text: for tools (show-alignment), not the trainer
            if read_latent:
                check_latent_sample(sample, teachers, shard)
                sample["latent"] = {t: contract_latent(x) for t, x in sample["latent"].items()}
            else:
                sample.pop("latent", None)
                sample.pop("segment_ids", None)
            yield sample


def tar_sample(store: str | Path, teacher: str, shard: int, sample_id: str) -> dict[str, Any]:
    """One sample of one teacher's shard (backend.read_sample documents the form); its tar is read
    checked up to the sample."""
    tar = tar_path(store, teacher, shard)
    for record in tar_records(tar):
        if record["__key__"] == sample_id:
            r = decode_record(record)
            return {
                "shard": shard,
                "input_ids": r["input_ids"],
                "segment_ids": r.get("segment_ids"),
                "example": r.get("example"),
            }
    raise StoreError(f"store {store}: teacher {teacher!r} {tar.name} lacks sample {sample_id!r} its record lists")
