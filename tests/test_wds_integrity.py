"""Nothing corrupt is read from a webdataset store: a flipped byte anywhere in a tar (member
data, headers, padding, end blocks), a deleted, truncated or reordered tar is refused by the
trainer's stream (CorruptShard naming store, teacher, shard and tar) and reported by verify
as a problem of that shard; and one process at a time writes a shard."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import shutil
import socket
import tarfile

import google_crc32c
import numpy as np
import pytest

from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import DumpConfig
from kvdistill.store import WdsShardWriter, finalize, wds_samples
from kvdistill.store.errors import CorruptShard, ShardBusy, ShardComplete, StoreError
from kvdistill.store.verify import verify
from kvdistill.train.stream import KVStream

TEACHERS = ["teacher-a", "teacher-b"]


@pytest.fixture(scope="module")
def dumped(tiny_store, tmp_path_factory):
    """Both tiny teachers dumped straight into tars (the dump's WdsShardWriter), 2 shards, finalized."""
    store = tmp_path_factory.mktemp("wds-integrity") / "tiny.wds"
    base = DumpConfig(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
        backend="webdataset",
    )
    run_local(dump_tasks(base, tiny_store["teachers"]), progress=False)
    finalize(store)
    assert verify(store) == []
    return store


@pytest.fixture
def store(dumped, tmp_path):
    """A copy of the dumped store this test may damage."""
    return shutil.copytree(dumped, tmp_path / "tiny.wds")


def _tar(store, teacher: str, shard: int):
    return store / "teachers" / teacher / f"shard-{shard:05d}.tar"


def _stream_everything(store) -> list[str]:
    """Every sample of every shard, as the trainer reads them."""
    return [s["sample_id"] for s in KVStream(store, TEACHERS, shuffle_buffer=1)]


def _shards_with_problems(store) -> set[tuple[str | None, int | None]]:
    return {(p.teacher, p.shard) for p in verify(store)}


def _flip(path, offsets, rng=None) -> None:
    data = bytearray(path.read_bytes())
    for o in offsets:
        data[o] ^= int(rng.integers(1, 256)) if rng is not None else 0x20
    path.write_bytes(bytes(data))


def _members(tar) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return tf.getmembers()


def test_random_flipped_bytes_in_any_tar_are_refused_by_the_trainers_stream_and_reported_by_verify(store):
    rng = np.random.default_rng(20260)
    tars = sorted(store.glob("teachers/*/shard-*.tar"))
    for trial in range(20):
        tar = tars[int(rng.integers(len(tars)))]
        original = tar.read_bytes()
        offsets = sorted(int(o) for o in rng.choice(len(original), size=int(rng.integers(1, 5)), replace=False))
        _flip(tar, offsets, rng)
        teacher, shard = tar.parent.name, int(tar.stem.removeprefix("shard-"))
        where = f"trial {trial}: {teacher} {tar.name}, bytes {offsets} of {len(original)}"
        assert _shards_with_problems(store) == {(teacher, shard)}, where
        with pytest.raises(
            CorruptShard,
            match=rf"store {re.escape(str(store))}: teacher '{teacher}' shard-{shard:05d}: .*{re.escape(tar.name)}",
        ):
            _stream_everything(store)
        tar.write_bytes(original)
    assert verify(store) == []


def test_a_flipped_byte_in_a_member_is_refused_before_its_record_is_decoded_naming_the_member(store):
    tar = _tar(store, "teacher-a", 1)
    k4 = [m for m in _members(tar) if m.name.endswith(".k.npy")][4]
    _flip(tar, [k4.offset_data + k4.size // 2])  # inside the K values: np.load would read it happily
    key = k4.name.removesuffix(".k.npy")
    read = []
    with pytest.raises(
        CorruptShard,
        match=rf"teacher 'teacher-a' shard-00001: member {key}\.k\.npy of {re.escape(str(tar))} fails its crc32c",
    ):
        for s in wds_samples(store, ["teacher-a"], 1):
            read.append(s["sample_id"])
    assert len(read) == 4 and key not in read
    problems = [p for p in verify(store) if (p.teacher, p.shard) == ("teacher-a", 1)]
    assert any(f"member {key}.k.npy" in p.what for p in problems), problems


def _outside_members(tar) -> dict[str, tuple[int, str]]:
    """Offsets of bytes no member's data holds, and the refusal each must get."""
    ms = _members(tar)
    padded = next(m for m in ms if m.size % 512)
    return {
        "first header": (0, "does not parse after 0 of"),
        "a later header": (ms[9].offset + 3, r"(ends after 1 of|ends inside record 1 )"),
        # Not summed by the header checksum and ignored by tarfile: only the whole-file crc32c sees it.
        "a header checksum's trailing byte": (ms[7].offset + 155, "whole-file crc32c"),
        "padding after a member": (padded.offset_data + padded.size + 7, "whole-file crc32c"),
        "the end-of-archive blocks": (ms[-1].offset_data + -(-ms[-1].size // 512) * 512 + 100, "whole-file crc32c"),
        "the last byte": (tar.stat().st_size - 1, "whole-file crc32c"),
    }


@pytest.mark.parametrize(
    "place",
    [
        "first header",
        "a later header",
        "a header checksum's trailing byte",
        "padding after a member",
        "the end-of-archive blocks",
        "the last byte",
    ],
)
def test_a_flipped_byte_outside_every_member_is_refused_too(store, place):
    tar = _tar(store, "teacher-b", 0)
    offset, refusal = _outside_members(tar)[place]
    _flip(tar, [offset])
    with pytest.raises(CorruptShard, match=rf"teacher 'teacher-b' shard-00000: .*{refusal}"):
        _stream_everything(store)
    assert _shards_with_problems(store) == {("teacher-b", 0)}


def test_a_deleted_tar_is_refused_naming_it(store):
    tar = _tar(store, "teacher-b", 1)
    tar.unlink()
    problems = verify(store)
    assert [(p.teacher, p.shard, p.what) for p in problems if p.shard == 1] == [
        ("teacher-b", 1, "shard-00001.tar is missing (deleted or lost)")
    ]
    with pytest.raises(
        CorruptShard,
        match=rf"teacher 'teacher-b' shard-00001: tar {re.escape(str(tar))} is missing \(deleted or lost\)",
    ):
        _stream_everything(store)


def _cut_points(tar) -> dict[str, tuple[int, str]]:
    ms = _members(tar)
    per_record = len({m.name.split(".", 1)[1] for m in ms})
    n = len(ms) // per_record
    return {
        "inside a member": (ms[13].offset_data + 100, rf"does not parse after {13 // per_record} of {n} records"),
        "at a record boundary": (ms[5 * per_record].offset, rf"ends after 5 of {n} records"),
        "inside a record, between members": (ms[5 * per_record + 2].offset, rf"ends inside record 5 .* of {n}"),
        "only the end-of-archive blocks": (
            ms[-1].offset_data + -(-ms[-1].size // 512) * 512,
            r"whole-file crc32c: \d+ bytes .* written as \d+ bytes",
        ),
    }


@pytest.mark.parametrize(
    "cut",
    ["inside a member", "at a record boundary", "inside a record, between members", "only the end-of-archive blocks"],
)
def test_a_truncated_tar_is_refused_naming_how_far_it_got(store, cut):
    tar = _tar(store, "teacher-a", 0)
    size, refusal = _cut_points(tar)[cut]
    tar.write_bytes(tar.read_bytes()[:size])
    with pytest.raises(CorruptShard, match=rf"teacher 'teacher-a' shard-00000: .*{refusal}"):
        _stream_everything(store)
    problems = verify(store)
    assert {(p.teacher, p.shard) for p in problems} == {("teacher-a", 0)}
    assert any(re.search(refusal, p.what) for p in problems), problems


def test_records_in_another_order_are_refused_even_with_a_matching_file_checksum(store):
    tar = _tar(store, "teacher-a", 1)
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    per_record = len(members) // json.loads(tar.with_suffix(".json").read_text())["samples"]
    members = (
        members[per_record : 2 * per_record] + members[:per_record] + members[2 * per_record :]
    )  # records 0, 1 swapped
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    sidecar = tar.with_suffix(".json")
    rec = json.loads(sidecar.read_text())
    rec["crc32c"]["tar"], rec["crc32c"]["size"] = google_crc32c.value(tar.read_bytes()), tar.stat().st_size
    sidecar.write_text(json.dumps(rec))
    first, second = rec["sample_ids"][:2]
    with pytest.raises(
        CorruptShard, match=rf"holds record '{second}' where its completion record lists '{first}' \(record 0 of"
    ):
        list(wds_samples(store, ["teacher-a"], 1))
    assert _shards_with_problems(store) == {("teacher-a", 1)}


def test_a_tar_written_without_checksums_is_refused_with_a_request_to_redump(store):
    sidecar = _tar(store, "teacher-a", 0).with_suffix(".json")
    rec = json.loads(sidecar.read_text())
    del rec["crc32c"]
    sidecar.write_text(json.dumps(rec | {"crc32": {"tar": 0}}))  # as written before per-record checksums
    with pytest.raises(StoreError, match="written by an older kvdistill.*re-dump this teacher into a new store") as e:
        _stream_everything(store)
    assert not isinstance(e.value, CorruptShard)
    assert any(
        "older kvdistill" in p.what and "re-dump" in p.fix
        for p in verify(store)
        if (p.teacher, p.shard) == ("teacher-a", 0)
    )


def _write_and_hold(root, ready, done) -> None:
    """Another process: own (t, shard 0), write a sample, wait to be told, then commit."""
    with WdsShardWriter(root, "t", 0, num_layers=1, width=4) as w:
        w.write("a", np.ones((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32), [1, 2], [True, False])
        ready.set()
        done.wait(30)


def test_a_second_writer_of_a_shard_in_another_process_fails_naming_the_first(tmp_path):
    root = tmp_path / "s.wds"
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_write_and_hold, args=(root, ready, done))
    first.start()
    try:
        assert ready.wait(30), "the first writer did not start"
        with pytest.raises(
            ShardBusy,
            match=(
                rf"teacher 't' shard-00000 .* is being written by pid {first.pid} on host"
                rf" {re.escape(socket.gethostname())}"
            ),
        ):
            WdsShardWriter(root, "t", 0, num_layers=1, width=4)
        assert not _tar(root, "t", 0).exists()  # the refused writer touched nothing
    finally:
        done.set()
        first.join(30)
    assert first.exitcode == 0
    with pytest.raises(ShardComplete):  # waits for the owner if it is still committing, then finds the shard done
        WdsShardWriter(root, "t", 0, num_layers=1, width=4, on_busy="wait")
    assert [s["sample_id"] for s in wds_samples(root, ["t"], 0)] == ["a"]
    assert not (root / ".partial").exists()  # lock file and folders gone after the commit


def test_a_killed_attempt_is_discarded_by_the_next_writer_and_an_abort_leaves_nothing(tmp_path):
    root = tmp_path / "s.wds"
    stale = root / ".partial" / "t" / "shard-00000.otherhost-123.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a tar")
    orphan = _tar(root, "t", 0).with_suffix(".json")  # a record whose tar never arrived
    orphan.parent.mkdir(parents=True)
    orphan.write_text("{}")
    w = WdsShardWriter(root, "t", 0, num_layers=1, width=4)
    assert not stale.exists() and not orphan.exists()
    w.write("a", np.ones((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32), [1, 2], [True, False])
    w.abort()
    assert not (root / ".partial").exists() and not _tar(root, "t", 0).exists() and not orphan.exists()
