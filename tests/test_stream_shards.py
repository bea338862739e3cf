"""KVStream(shards=...): a stream that reads only some of a store's shards (the rest held out,
e.g. for validation), in a seeded epoch order over those alone."""

import pytest

from kvdistill.store import ShardReader
from kvdistill.train.stream import KVStream

TEACHERS = ["teacher-a", "teacher-b"]


def test_a_stream_over_some_shards_yields_exactly_their_samples(tiny_store):
    store = tiny_store["store"]
    got = list(KVStream(store, TEACHERS, shards=[1], shuffle_buffer=4))
    assert {s["shard"] for s in got} == {1}
    assert sorted(s["sample_id"] for s in got) == sorted(ShardReader(store, "teacher-a", 1).sample_ids)


def test_every_shard_named_is_the_same_stream_as_no_subset(tiny_store):
    every, named = (
        KVStream(tiny_store["store"], TEACHERS, seed=5),
        KVStream(tiny_store["store"], TEACHERS, seed=5, shards=[1, 0]),
    )
    for epoch in range(4):
        every.set_epoch(epoch)
        named.set_epoch(epoch)
        assert named.epoch_order() == every.epoch_order()
    assert [s["sample_id"] for s in named] == [s["sample_id"] for s in every]


def test_the_epoch_order_of_a_subset_holds_only_its_shards(tiny_store):
    stream = KVStream(tiny_store["store"], TEACHERS, shards=[0])
    assert stream.epoch_order() == [0] and len(stream) == len(ShardReader(tiny_store["store"], "teacher-a", 0))


@pytest.mark.parametrize("shards", [[2], [-1], [0, 0], []], ids=["beyond", "negative", "twice", "none"])
def test_shards_that_are_not_distinct_shards_of_the_store_are_refused(tiny_store, shards):
    with pytest.raises(ValueError, match=r"need distinct shard indices in 0\.\.1"):
        KVStream(tiny_store["store"], TEACHERS, shards=shards)


def test_more_ranks_than_shards_still_split_every_global_batch(tiny_store):
    """Ranks split global batches, not shards: one shard feeds any number of ranks."""
    from kvdistill.train.stream import MicroBatches

    got = [
        [
            i
            for b in MicroBatches(
                KVStream(tiny_store["store"], TEACHERS, shards=[1]),
                4,
                lambda s: {"ids": [x["sample_id"] for x in s]},
                rank=r,
                world_size=2,
            )
            if b["weight"]
            for i in b["ids"]
        ]
        for r in range(2)
    ]
    assert (
        sorted(got[0] + got[1]) == sorted(ShardReader(tiny_store["store"], "teacher-a", 1).sample_ids)
        and got[0]
        and got[1]
    )
