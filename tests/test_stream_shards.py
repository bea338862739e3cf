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
    every, named = KVStream(tiny_store["store"], TEACHERS, seed=5), KVStream(tiny_store["store"], TEACHERS, seed=5, shards=[1, 0])
    for epoch in range(4):
        every.set_epoch(epoch)
        named.set_epoch(epoch)
        assert named.epoch_order(1) == every.epoch_order(1)
    assert [s["sample_id"] for s in named] == [s["sample_id"] for s in every]


def test_the_epoch_order_of_a_subset_holds_only_its_shards(tiny_store):
    stream = KVStream(tiny_store["store"], TEACHERS, shards=[0])
    assert stream.epoch_order(1) == [0] and stream.shards_for(0, 1) == [0]


@pytest.mark.parametrize("shards", [[2], [-1], [0, 0], []], ids=["beyond", "negative", "twice", "none"])
def test_shards_that_are_not_distinct_shards_of_the_store_are_refused(tiny_store, shards):
    with pytest.raises(ValueError, match=r"need distinct shard indices in 0\.\.1"):
        KVStream(tiny_store["store"], TEACHERS, shards=shards)


def test_a_subset_with_fewer_shards_than_readers_says_so(tiny_store):
    stream = KVStream(tiny_store["store"], TEACHERS, shards=[1], world_size=2)
    with pytest.raises(ValueError, match="stream reads 1 of the store's 2 shards but 2 ranks x 1 workers = 2 readers; .*Hold out fewer shards"):
        stream.epoch_order(1)
