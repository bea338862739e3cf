"""One interface over both backends (zarr, webdataset): open the writer of a shard, read the
samples of shards. The store's spec says which backend a store is; callers never branch on it.

    with open_shard_writer(store, "teacher-a", 3, spec, width=64, codec="float16") as w:
        w.write("id-1", k, v, input_ids, loss_mask, segment_ids)

    for sample in shard_samples(store, ["teacher-a", "teacher-b"], [3, 0]):
        ...
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvdistill.schemas import StoreSpec

from .layout import is_wds_store
from .samples import check_latent_sample, contract_latent, zarr_samples
from .wds import WdsShardWriter, wds_shard_samples
from .writer import ShardWriter, compression

__all__ = ["open_shard_writer", "shard_samples"]


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
) -> ShardWriter | WdsShardWriter:
    """The writer of one shard of `teacher` in the backend `spec.backend`, with the spec's student
    layers (and, for zarr, its compression). Both writers take write(sample_id, k, v, input_ids,
    loss_mask, segment_ids, latent), close(extra_attrs) and abort(), and are context managers
    that discard the shard on an exception; both refuse a shard another live writer owns
    (ShardBusy, or wait with on_busy="wait") and one that is complete (ShardComplete)."""
    args = {"num_layers": spec.geometry.num_layers, "width": width, "codec": codec, "latent_slots": latent_slots, "on_busy": on_busy}
    if spec.backend == "webdataset":
        return WdsShardWriter(store, teacher, shard, **args)
    return ShardWriter(store, teacher, shard, **args, **compression(spec))


def shard_samples(
    store: str | Path,
    teachers: list[str],
    shards: list[int],
    *,
    read_kv: bool = True,
    read_latent: bool = False,
    decode: bool = True,
    start: int = 0,
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
    has none).

    start: begin at that sample of the sequence (a resumed stream). A zarr store opens no shard
    before it and reads no span before it; webdataset tars stream from their start, checked,
    and the samples before it are read, checked and dropped."""
    if is_wds_store(store):
        return itertools.islice(_tar_samples(store, teachers, shards, read_latent), start, None)
    return zarr_samples(store, teachers, shards, read_kv=read_kv, read_latent=read_latent, decode=decode, start=start)


def _tar_samples(store: str | Path, teachers: list[str], shards: list[int], read_latent: bool) -> Iterator[dict[str, Any]]:
    """A webdataset store's samples in the zarr path's form: latent records only with read_latent."""
    for sample in wds_shard_samples(store, teachers, shards):
        if read_latent:
            check_latent_sample(sample, teachers, sample["shard"])
            sample["latent"] = {t: contract_latent(x) for t, x in sample["latent"].items()}
        else:
            sample.pop("latent", None)
            sample.pop("segment_ids", None)
        yield sample
