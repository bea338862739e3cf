"""The global sample order (train/stream.py): one order per epoch whatever the number of ranks
and workers; each global batch split across ranks; a resume (samples consumed) continuing it
exactly on any number of processes, reading nothing before its position."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import kvdistill.store.samples as store_samples
import kvdistill.train.stream as stream_mod
from kvdistill.store import StoreError
from kvdistill.train.stream import KVStream, MicroBatches, _shuffled, collate, windows

TEACHERS = ["teacher-a", "teacher-b"]


@given(
    n=st.integers(0, 200),
    start_frac=st.floats(0, 1),
    b=st.integers(1, 9),
    accum=st.integers(1, 3),
    world=st.integers(1, 4),
    drop=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_windows_cover_every_sample_once_and_do_not_depend_on_the_split(n, start_frac, b, accum, world, drop):
    start = round(start_frac * n)
    wins = windows(n, start, b, accum, world, drop)
    one = windows(n, start, b * accum * world, 1, 1, drop)  # one process, one micro-batch per step
    assert [(w.start, w.size) for w in wins] == [(w.start, w.size) for w in one]  # the same samples per step
    covered = [j for w in wins for m in w.slices for a, z in m for j in range(a, z)]
    # slot order (micro-batch m of rank r = slot m x world + r) walks the window in order
    assert covered == list(range(start, start + sum(w.size for w in wins)))
    G = b * accum * world
    assert sum(w.size for w in wins) == ((n - start) // G * G if drop else n - start)
    for w in wins:
        sizes = [z - a for m in w.slices for a, z in m]
        assert len(w.slices) == w.micros <= accum and all(len(m) == world for m in w.slices)
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= b
        if w.size == G:
            assert sizes == [b] * (accum * world)


def _plan(tiny_store, *, world=1, rank=0, b=4, accum=1, workers=0, buffer=7, seed=5, epoch=1, start=0):
    stream = KVStream(tiny_store["store"], TEACHERS, seed=seed, shuffle_buffer=buffer)
    mb = MicroBatches(stream, b, lambda s: collate(s, 0), accumulation=accum, rank=rank, world_size=world)
    mb.set_epoch(epoch, start)
    return [
        (x["window"], x["micro"], x["weight"], x["sample_ids"], x["kv"]["teacher-b"][1].numpy().tobytes())
        for x in DataLoader(mb, batch_size=None, num_workers=workers)
    ]


def _steps(runs):
    """{step: [(sample id, K/V bytes) of every real sample, in slot order]} over ranks' plans."""
    out: dict[int, list] = {}
    world = len(runs)
    for r, plan in enumerate(runs):
        for w, m, weight, ids, _ in plan:
            if weight:
                out.setdefault(w, {})[(m, r)] = ids
    return {
        w: [i for (m, r) in sorted(slots, key=lambda mr: mr[0] * world + mr[1]) for i in slots[(m, r)]]
        for w, slots in out.items()
    }


@pytest.mark.parametrize(
    ("world", "b", "accum", "workers"), [(2, 4, 1, 0), (2, 4, 1, 2), (1, 4, 2, 0), (3, 5, 1, 1), (2, 3, 2, 2)]
)
def test_n_ranks_x_batch_b_train_the_samples_of_one_rank_x_batch_n_b_in_the_same_order(
    tiny_store, world, b, accum, workers
):
    one = _plan(tiny_store, b=b * world * accum)
    split = [_plan(tiny_store, world=world, rank=r, b=b, accum=accum, workers=workers) for r in range(world)]
    assert _steps(split) == _steps([one])
    assert len({len(p) for p in split}) == 1  # every rank runs as many micro-batches (stand-ins included)


def test_the_order_is_the_shuffle_buffer_over_the_shards_in_their_seeded_order(tiny_store):
    stream = KVStream(tiny_store["store"], TEACHERS, seed=3, shuffle_buffer=5)
    stream.set_epoch(2)
    shards = stream.epoch_order(2)
    plain = KVStream(tiny_store["store"], TEACHERS, shuffle_buffer=1, shards=shards[:1])
    concat = [s["sample_id"] for s in KVStream(tiny_store["store"], TEACHERS, shuffle_buffer=1, shards=shards[1:])]
    concat = [s["sample_id"] for s in plain] + concat
    want = [concat[p] for p in _shuffled(range(len(concat)), 5, random.Random("3-2"))]
    assert [s["sample_id"] for s in stream] == want


@pytest.mark.parametrize(
    ("world_from", "world_to", "workers"), [(1, 1, 0), (2, 2, 2), (2, 1, 0), (1, 2, 1), (2, 3, 0)]
)
def test_a_resume_continues_the_global_order_on_any_number_of_processes(tiny_store, world_from, world_to, workers):
    G = 8
    full = _steps([_plan(tiny_store, world=world_from, rank=r, b=G // world_from) for r in range(world_from)])
    flat = [i for w in sorted(full) for i in full[w]]
    for steps_done in (1, 3, 5, 6):
        rest = _steps(
            [
                _plan(tiny_store, world=world_to, rank=r, b=-(-G // world_to), workers=workers, start=steps_done * G)
                for r in range(world_to)
            ]
        )
        assert [i for w in sorted(rest) for i in rest[w]] == flat[steps_done * G :], steps_done


@pytest.fixture
def read(monkeypatch) -> list[str]:
    """The sample ids the store yields to the stream, as it reads them."""
    got: list[str] = []
    real = stream_mod.shard_samples

    def counting(*args, **kw):
        for s in real(*args, **kw):
            got.append(s["sample_id"])
            yield s

    monkeypatch.setattr(stream_mod, "shard_samples", counting)
    return got


def test_a_resume_reads_only_what_is_left(tiny_store, read):
    full = _plan(tiny_store, b=4, buffer=2, epoch=0)
    assert len(read) == 48
    read.clear()
    rest = _plan(tiny_store, b=4, buffer=2, epoch=0, start=40)
    assert [x[3] for x in rest] == [x[3] for x in full[10:]]
    assert len(read) == 8, read  # exactly the samples left


def test_each_rank_reads_only_its_own_samples(tiny_store, read):
    plans = []
    for r in range(2):
        read.clear()
        plans.append(_plan(tiny_store, world=2, rank=r, b=4))
        assert sorted(read) == sorted(i for x in plans[-1] for i in x[3]) and len(read) == 24


def test_resuming_past_the_end_of_the_epoch_names_the_mismatch(tiny_store):
    with pytest.raises(
        StoreError, match="resumes after sample 50 of an epoch, but an epoch of store .* has 48 samples"
    ):
        _plan(tiny_store, start=50)


def test_a_late_resume_starts_inside_the_last_shard_without_opening_the_first(tiny_store, monkeypatch):
    opened = []
    real_open = store_samples._ZarrShards.open
    monkeypatch.setattr(
        store_samples._ZarrShards,
        "open",
        lambda self, root, index, shard: (opened.append(shard), real_open(self, root, index, shard))[1],
    )
    full = _plan(tiny_store, b=4, buffer=1, epoch=0)
    order = list(dict.fromkeys(opened))
    assert len(order) == 2  # the uninterrupted epoch opens both shards (24 samples each)
    opened.clear()
    rest = _plan(tiny_store, b=4, buffer=1, epoch=0, start=36)  # the resume starts at sample 12 of the second shard
    assert [x[1:] for x in rest] == [x[1:] for x in full[9:]]  # windows count from the resumed position
    assert opened == [order[1]]
