"""KVStream.resume: a resumed epoch yields exactly the batches the uninterrupted one yields after
the checkpoint, through the shuffle buffer and DataLoader workers, without reading what the
checkpoint had already trained on."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import kvdistill.store.samples as store_samples
import kvdistill.train.stream as stream_mod
from kvdistill.store import StoreError
from kvdistill.train.stream import KVStream, _shuffled, buffer_state, collate

TEACHERS = ["teacher-a", "teacher-b"]


def _loader(tiny_store, batch_size, num_workers=0, drop_last=False, **kw):
    stream = KVStream(tiny_store["store"], TEACHERS, seed=5, **kw)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=lambda s: collate(s, 0), drop_last=drop_last)
    return stream, loader


def _batches(loader, epoch, stream):
    stream.set_epoch(epoch)
    return [(b["sample_ids"], b["kv"]["teacher-b"][1].numpy().tobytes()) for b in loader]


@given(n=st.integers(0, 300), size=st.integers(1, 70), skip_frac=st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_buffer_state_continues_the_shuffle_buffer_exactly(n, size, skip_frac):
    skip = round(skip_frac * n)
    full = list(_shuffled(range(n), size, random.Random("x")))
    rng = random.Random("x")
    held, next_read, tail = buffer_state(n, size, rng, skip)
    if tail is not None:
        assert tail == full[skip:]
        return
    assert all(p < next_read for p in held) and len(held) < size
    assert list(_shuffled(range(next_read, n), size, rng, list(held))) == full[skip:]


@pytest.mark.parametrize(("batch_size", "buffer", "num_workers", "drop_last"), [(4, 16, 0, False), (5, 7, 2, False), (3, 1, 2, True), (8, 256, 0, True)])
def test_a_resumed_epoch_yields_the_rest_of_the_uninterrupted_one(tiny_store, batch_size, buffer, num_workers, drop_last):
    stream, loader = _loader(tiny_store, batch_size, num_workers, drop_last, shuffle_buffer=buffer)
    full = _batches(loader, 1, stream)
    assert len(full) >= 6
    for n in sorted({1, 2, len(full) // 2, len(full) - 2, len(full) - 1, len(full)}):
        stream, loader = _loader(tiny_store, batch_size, num_workers, drop_last, shuffle_buffer=buffer)
        stream.resume(1, n, batch_size, num_workers, drop_last)
        assert _batches(loader, 1, stream) == full[n:], n
    fresh, fresh_loader = _loader(tiny_store, batch_size, num_workers, drop_last, shuffle_buffer=buffer)
    assert _batches(loader, 2, stream) == _batches(fresh_loader, 2, fresh)  # the resume state is for its epoch only


def test_resume_reads_no_sample_before_the_shuffle_buffer_it_rebuilds(tiny_store, monkeypatch):
    read = []
    real = stream_mod.shard_samples

    def counting(*args, **kw):
        for s in real(*args, **kw):
            read.append(s["sample_id"])
            yield s

    monkeypatch.setattr(stream_mod, "shard_samples", counting)
    stream, loader = _loader(tiny_store, 4, shuffle_buffer=2)
    full = _batches(loader, 0, stream)
    assert len(read) == 48
    read.clear()
    stream, loader = _loader(tiny_store, 4, shuffle_buffer=2)
    stream.resume(0, 10, 4)  # 40 of 48 samples trained
    assert _batches(loader, 0, stream) == full[10:]
    assert len(read) <= 8 + 6, read  # the 8 left and the few the buffer still holds, not 48


def test_resuming_past_the_end_of_the_epoch_names_the_mismatch(tiny_store):
    stream, _ = _loader(tiny_store, 8)
    with pytest.raises(StoreError, match="resumes after batch 7 of epoch 0, but the epoch has 6 batches of 8"):
        stream.resume(0, 7, 8)


def test_a_late_resume_starts_inside_the_last_shard_without_opening_the_first(tiny_store, monkeypatch):
    opened = []
    real_open = store_samples._ZarrShards.open
    monkeypatch.setattr(store_samples._ZarrShards, "open", lambda self, root, index, shard: (opened.append(shard), real_open(self, root, index, shard))[1])
    stream, loader = _loader(tiny_store, 4, shuffle_buffer=1)
    full = _batches(loader, 0, stream)
    order = list(dict.fromkeys(opened))
    assert len(order) == 2  # the uninterrupted epoch opens both shards (24 samples each)
    opened.clear()
    stream, loader = _loader(tiny_store, 4, shuffle_buffer=1)
    stream.resume(0, 9, 4)  # 36 samples trained: the resume starts at sample 12 of the second shard
    assert _batches(loader, 0, stream) == full[9:]
    assert opened == [order[1]]
