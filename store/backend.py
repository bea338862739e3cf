"""One interface over both backends (zarr, webdataset): open the writer of a shard, read the
samples of shards, read one sample. The store's spec says which backend a store is; callers
never branch on it.

    with open_shard_writer(store, "teacher-a", 3, spec, width=64, codec="float16") as w:
        w.write("id-1", k, v, input_ids, loss_mask, segment_ids)

    for sample in shard_samples(store, ["teacher-a", "teacher-b"], [3, 0]):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvdistill.schemas import StoreSpec

from .errors import CorruptShard, StoreError
from .layout import INDEX, is_wds_store, read_store_spec, shard_attrs, shard_is_complete, shard_name, teacher_dir
from .reader import ShardReader, index_damage, read_index_table
from .samples import zarr_samples
from .wds_reader import tar_sample, tar_samples
from .wds_writer import WdsShardWriter
from .writer import ShardWriter, compression

__all__ = ["open_shard_writer", "shard_samples", "read_sample"]


def open_shard_writer(
    store: str | Path,
    teacher: str,
    shard: int,
    spec: StoreSpec,
    *,
    width: int,
    codec: str = "float16",
    latent_slots: int | None = None,
    on_busy: str = "fail",
    logits_top_k: int = 0,
    vocab_size: int | None = None,
) -> ShardWriter | WdsShardWriter:
    """The writer of one shard of `teacher` in the backend `spec.backend`, with the spec's student
    layers (and, for zarr, its compression). Both writers take write(sample_id, k, v, input_ids,
    loss_mask, segment_ids, latent), close(extra_attrs) and abort(), and are context managers
    that discard the shard on an exception; both refuse a shard another live writer owns
    (ShardBusy, or wait with on_busy="wait") and one that is complete (ShardComplete).
    logits_top_k > 0 (zarr only; StoreError for webdataset): the writer also takes the teacher's
    top-k log-probs, write(..., logits=(ids, lp)), over a vocabulary of vocab_size."""
    args = {
        "num_layers": spec.geometry.num_layers,
        "width": width,
        "codec": codec,
        "latent_slots": latent_slots,
        "on_busy": on_busy,
    }
    if spec.backend == "webdataset":
        if logits_top_k:
            raise StoreError("teacher logits are stored by the zarr backend only; use --backend zarr")
        return WdsShardWriter(store, teacher, shard, **args)
    logits = {"logits_top_k": logits_top_k, "vocab_size": vocab_size} if logits_top_k else {}
    return ShardWriter(store, teacher, shard, **args, **logits, **compression(spec))


def shard_samples(
    store: str | Path,
    teachers: list[str],
    shards: list[int],
    *,
    read_kv: bool = True,
    read_latent: bool = False,
    decode: bool = True,
    keep: np.ndarray | None = None,
    read_logits: bool = False,
) -> Iterator[dict[str, Any]]:
    """The samples of `shards`, in this order, every teacher zipped; every chunk / tar checked as
    it is read (CorruptShard on damage). Each sample:

        {"sample_id", "shard", "input_ids" [T] int32, "loss_mask" [T] bool,
         "kv": {teacher: (k, v) [T, L_s, D]}}

    K/V with decode: float16 / float32 as stored, the other codecs as float32; without, as
    stored: bfloat16 as its uint16 bit patterns, int8 / int4 as `codecs.QuantRows`. read_kv=False
    skips reading K/V of a zarr store ("kv" is {}); a webdataset record carries them anyway.
    With read_latent also "segment_ids" [T] and "latent": {teacher: {"k", "v" [M, L_s, D]
    float32, "mask" [M] bool, "hidden" [H] float32 (only if stored)}} (StoreError if a teacher
    has none). With read_logits also "logits": {teacher: (ids [T, K] int32, lp [T, K] float16)}
    for every teacher that stores them (zarr only; store/samples.py says which rows).

    keep: only the samples at these positions of the sequence (sorted, distinct; None: all), in
    sequence order: a trainer rank's share of the global sample order. Neither backend opens a
    shard that holds none of them; a zarr store reads no chunk that holds none of them, a
    webdataset tar streams whole, checked, and its other samples are dropped."""
    if is_wds_store(store):
        if read_logits:
            raise StoreError(f"store {store}: a webdataset store holds no teacher logits (zarr only)")
        return tar_samples(store, teachers, shards, read_latent=read_latent, keep=keep)
    return zarr_samples(
        store,
        teachers,
        shards,
        read_kv=read_kv,
        read_latent=read_latent,
        decode=decode,
        keep=keep,
        read_logits=read_logits,
    )


def read_sample(store: str | Path, teacher: str, sample_id: str) -> dict[str, Any]:
    """One sample of one teacher's shards, either backend, for tools that look at a single sample:

        {"shard", "input_ids" [T] int32, "segment_ids" [T] uint8 or None, "example":
         {"question", "reasoning", "answer"} or None (both None in stores written before
         kvdistill recorded them)}

    Found through index.parquet, or (a store not finalized yet) the shards' sample ids. A sample
    that is not there is a StoreError saying so (and whether the dump skipped it)."""
    store = Path(store)
    shard, j = _locate(store, teacher, sample_id)
    if is_wds_store(store):
        return tar_sample(store, teacher, shard, sample_id)
    r = ShardReader(store, teacher, shard)
    names = ("input_ids", *(("segment_ids",) if "segment_ids" in r.names else ()))
    rows = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), names)
    examples = r.examples(j, j + 1)
    return {
        "shard": shard,
        "input_ids": rows["input_ids"],
        "segment_ids": rows.get("segment_ids"),
        "example": examples[0] if examples else None,
    }


def _locate(store: Path, teacher: str, sample_id: str) -> tuple[int, int]:
    """(shard, index in the shard) of a sample of `teacher`."""
    if (store / INDEX).exists():
        try:  # the plain reader: pyarrow's filtered read hangs on some corrupt files
            t = read_index_table(store / INDEX, ["teacher", "sample_id", "shard", "sample_index"])
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise
            raise CorruptShard(index_damage(store / INDEX, e)) from e
        hit = [
            i
            for i, (t_, s_) in enumerate(zip(t["teacher"].to_pylist(), t["sample_id"].to_pylist(), strict=True))
            if t_ == teacher and s_ == sample_id
        ]
        if hit:
            return int(t["shard"][hit[0]].as_py()), int(t["sample_index"][hit[0]].as_py())
    ids, skipped = [], {}
    for i in range(read_store_spec(store).num_shards):
        if not shard_is_complete(store, teacher, i):
            continue
        attrs = shard_attrs(teacher_dir(store, teacher) / shard_name(i)) or {}
        shard_ids = attrs["sample_ids"] if "sample_ids" in attrs else ShardReader(store, teacher, i).sample_ids
        if sample_id in shard_ids:
            return i, shard_ids.index(sample_id)
        ids += shard_ids
        skipped |= dict.fromkeys(attrs.get("skipped", []), attrs.get("max_len"))
    if sample_id in skipped:
        raise StoreError(
            f"store {store}: sample {sample_id!r} was skipped by teacher {teacher!r}'s dump (over max_len"
            f" {skipped[sample_id]}); pick another sample (`kvdistill store inspect` counts them)"
        )
    some = ", ".join(repr(x) for x in ids[:3]) or "none"
    raise StoreError(
        f"store {store}: teacher {teacher!r} holds no sample {sample_id!r} ({len(ids)} samples, e.g. {some})"
    )
