"""Faults of the zarr store that must never reach training as data: two writers of one shard,
flipped bytes anywhere in any chunk file of any codec, a deleted chunk file. The long campaign
(kill -9 at random moments, more trials, disk full, read-only) is bench/faults.py.

Every test here was checked against a deliberate mutation (the lock, the crc32c check, the
missing-chunk check each removed in turn): each one then fails."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvdistill.cli import main
from kvdistill.schemas import DumpConfig
from kvdistill.store import ShardReader, ShardWriter, finalize, shard_is_complete, shard_name
from kvdistill.store.errors import CorruptShard, ShardBusy, ShardComplete
from kvdistill.store.stats import stats
from kvdistill.store.verify import verify
from kvdistill.train.stream import KVStream

TEACHERS = ["teacher-a", "teacher-b"]
CODECS = ("float16", "bfloat16", "int8", "int4", "float32")


# --- one writer per (teacher, shard) ----------------------------------------------------------


def _samples(n: int = 12) -> list[tuple]:
    rng = np.random.default_rng(7)
    out = []
    for j in range(n):
        T = int(rng.integers(20, 60))
        out.append(
            (
                f"s{j}",
                rng.normal(size=(T, 2, 16)).astype(np.float32),
                rng.normal(size=(T, 2, 16)).astype(np.float32),
                rng.integers(0, 99, T),
                rng.random(T) < 0.5,
            )
        )
    return out


def _write(store: Path, on_busy: str, delay: float, pause: float, queue) -> None:
    """One array task writing shard 0 of teacher t: 'written', 'busy: ...' or 'complete'."""
    time.sleep(delay)
    try:
        with ShardWriter(store, "t", 0, num_layers=2, width=16, codec="int8", on_busy=on_busy) as w:
            for sid, k, v, ids, mask in _samples():
                w.write(sid, k, v, ids, mask)
                time.sleep(pause)  # a slow task: the other one arrives while this one writes
        queue.put("written")
    except ShardBusy as e:
        queue.put(f"busy: {e}")
    except ShardComplete:
        queue.put("complete")
    except Exception as e:  # anything else is a finding, reported to the parent (never a hang)
        queue.put(f"error: {type(e).__name__}: {e}")


def _files(shard: Path) -> dict[str, bytes]:
    return {str(p.relative_to(shard)): p.read_bytes() for p in sorted(shard.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("on_busy", ["fail", "wait"])
def test_two_writers_of_one_shard_race_ten_times_and_the_shard_is_the_uninterrupted_one(tmp_path, on_busy):
    ref = tmp_path / "ref.zarr"
    _write(ref, "fail", 0, 0, mp.get_context("fork").SimpleQueue())
    want = _files(ref / "teachers" / "t" / shard_name(0))
    ctx = mp.get_context("fork")  # numpy / zarr only in the children: fork is safe here
    rng = random.Random(0)
    for trial in range(10):
        store = tmp_path / f"race-{trial}.zarr"
        queue = ctx.SimpleQueue()
        procs = [
            ctx.Process(target=_write, args=(store, on_busy, rng.uniform(0, 0.05), 0.005, queue)) for _ in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = sorted(queue.get() for _ in procs)
        assert [p.exitcode for p in procs] == [0, 0]
        assert outcomes.count("written") == 1, outcomes  # exactly one writer wrote it
        other = next(o for o in outcomes if o != "written")
        if on_busy == "fail":
            assert other == "complete" or other.startswith("busy: "), other
            if other.startswith("busy: "):  # names the owner
                assert f"pid {min(p.pid for p in procs)}" in other or f"pid {max(p.pid for p in procs)}" in other
                assert f"host {os.uname().nodename}" in other and "--on-busy wait" in other
        else:
            assert other == "complete"  # it waited, then found the shard done
        assert _files(store / "teachers" / "t" / shard_name(0)) == want, f"trial {trial}: not bit for bit"
        assert not (store / ".partial").exists()  # no lock, no attempt left behind


def test_a_killed_writer_never_blocks_the_next_one(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    p = ctx.Process(target=_write, args=(tmp_path / "s.zarr", "fail", 0, 0.5, queue))
    p.start()
    lock = tmp_path / "s.zarr" / ".partial" / "t" / f"{shard_name(0)}.lock"
    for _ in range(200):
        if lock.exists() and lock.read_text():
            break
        time.sleep(0.01)
    with pytest.raises(ShardBusy, match=rf"pid {p.pid} on host"):
        ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=2, width=16)
    p.kill()  # kill -9: no cleanup ran, the lock file and the attempt stay on disk
    p.join()
    assert lock.exists()
    _write(tmp_path / "s.zarr", "fail", 0, 0, queue)
    assert queue.get() == "written" and shard_is_complete(tmp_path / "s.zarr", "t", 0)
    assert not (tmp_path / "s.zarr" / ".partial").exists()


def test_two_dump_processes_of_one_shard(tiny_store, tmp_path):
    """The issue's case end to end: two `kvdistill dump` of the same (teacher, shard) started
    together. One writes, the other exits 6 naming the owner or finds the shard complete; with
    --on-busy wait both exit 0. Either way the shard verifies and equals the session store's."""
    store = tmp_path / "race.zarr"
    t = tiny_store["teachers"][0]
    config = DumpConfig(
        teacher=t,
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
    ).save(tmp_path / "dump.yaml")
    base = [sys.executable, "-m", "kvdistill.cli", "dump", "--config", str(config), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for on_busy in ("fail", "wait"):
        shutil.rmtree(store, ignore_errors=True)
        procs = [
            subprocess.Popen(
                [*base, "--on-busy", on_busy], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        results = [(p.wait(300), *p.communicate()) for p in procs]
        codes = sorted(r[0] for r in results)
        text = " ".join(r[1] + r[2] for r in results)
        if on_busy == "fail":
            assert codes in ([0, 0], [0, 6]), text
            if codes == [0, 6]:
                err = next(r[2] for r in results if r[0] == 6).strip()
                assert "\n" not in err and "is being written by pid" in err and "--on-busy wait" in err, err
        else:
            assert codes == [0, 0], text
        assert "already complete" in text or codes == [0, 6]
        want, got = ShardReader(tiny_store["store"], t.name, 0), ShardReader(store, t.name, 0)
        n = int(want.offsets[-1])
        assert got.sample_ids == want.sample_ids
        for name in ("k", "v", "input_ids", "loss_mask"):
            np.testing.assert_array_equal(got.rows(0, n, (name,))[name], want.rows(0, n, (name,))[name])


# --- corrupt bytes and missing chunks: verify and the trainer's reader both refuse ---------------


@pytest.fixture(scope="module")
def codec_stores(tiny_store, tmp_path_factory):
    """The session store with both teachers in each codec."""
    from test_store_tools import requantise

    out = {}
    for codec in CODECS:
        store = tmp_path_factory.mktemp(codec) / "s.zarr"
        shutil.copytree(tiny_store["store"], store)
        if codec != "float16":
            for t in TEACHERS:
                requantise(store, t, codec)
        finalize(store)
        out[codec] = store
    return out


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "teachers").glob("*/shard-*/*/c/**/*") if p.is_file())


def stream_all(store: Path) -> int:
    return sum(1 for _ in KVStream(store, TEACHERS, shuffle_buffer=1))


def test_random_byte_flips_in_random_chunk_files_are_refused_by_verify_and_the_stream_50_of_50(codec_stores, tmp_path):
    rng = random.Random(14)
    refused = {"verify": 0, "stream": 0}
    for trial in range(50):
        codec = CODECS[trial % len(CODECS)]
        store = tmp_path / f"t{trial}.zarr"
        shutil.copytree(codec_stores[codec], store)
        f = rng.choice(chunk_files(store))
        raw = bytearray(f.read_bytes())
        for at in rng.sample(range(len(raw)), min(len(raw), rng.randint(1, 4))):
            raw[at] ^= rng.randint(1, 255)
        f.write_bytes(bytes(raw))
        where = f"trial {trial}: {codec}, {f.relative_to(store)}"
        shard = f.relative_to(store / "teachers").parts[:2]
        problems = verify(store)
        if any((p.teacher, shard_name(p.shard) if p.shard is not None else None) == shard for p in problems):
            refused["verify"] += 1
        with pytest.raises(
            CorruptShard, match=r"store .*: teacher '.*' shard-0000\d: .*(crc32c|missing|truncated)"
        ) as e:
            stream_all(store)
        assert f"teacher '{shard[0]}' {shard[1]}" in str(e.value), where
        assert "\n" not in str(e.value)
        refused["stream"] += 1
        shutil.rmtree(store)
    assert refused == {"verify": 50, "stream": 50}


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_a_deleted_chunk_file_is_refused_naming_it_never_read_as_zeros(codec_stores, tmp_path, codec):
    for array in ("v", "loss_mask", "k_scale" if codec == "int8" else "input_ids", "offsets"):
        store = tmp_path / f"{array}.zarr"
        shutil.copytree(codec_stores[codec], store)
        f = [
            p
            for p in sorted((store / "teachers" / "teacher-b" / shard_name(1) / array / "c").rglob("*"))
            if p.is_file()
        ][-1]
        f.unlink()
        found = [p.what for p in verify(store) if (p.teacher, p.shard) == ("teacher-b", 1)]
        assert any(f"chunk file {f} is missing (deleted or lost)" in w for w in found), found
        with pytest.raises(
            CorruptShard,
            match=(
                rf"teacher 'teacher-b' shard-00001: array {array}:"
                rf" .*{f.relative_to(store / 'teachers' / 'teacher-b' / shard_name(1) / array)}.* is missing"
            ),
        ):
            stream_all(store)
        if array in ("v", "k_scale"):  # `store stats` reads K/V with dask through plain zarr: refused first
            with pytest.raises(CorruptShard, match=r"array .*: chunk file .* is missing"):
                stats(store)
        shutil.rmtree(store)


def test_kvdistill_train_on_a_corrupt_store_exits_4_with_one_line_naming_the_chunk(
    codec_stores, tiny_store, tmp_path, capsys
):
    store = tmp_path / "bad.zarr"
    shutil.copytree(codec_stores["float16"], store)
    f = next(
        p for p in sorted((store / "teachers" / "teacher-a" / shard_name(0) / "k" / "c").rglob("*")) if p.is_file()
    )
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    f.write_bytes(bytes(raw))
    code = main(
        [
            "train",
            "--store",
            str(store),
            "--student",
            tiny_store["student"].name_or_path,
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            "4",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 4, err
    assert "\n" not in err and "Traceback" not in err
    assert "teacher 'teacher-a' shard-00000: array k: chunk" in err and "fails its crc32c check" in err


@pytest.mark.parametrize("array", ["latent_k", "latent_mask", "codi_hidden"])
def test_a_flipped_byte_in_a_latent_array_is_refused_in_latent_mode_and_in_cot_mode(latent_store, tmp_path, array):
    store = tmp_path / "lat.zarr"
    shutil.copytree(latent_store["store"], store)
    f = next(
        p for p in sorted((store / "teachers" / "teacher-a" / shard_name(0) / array / "c").rglob("*")) if p.is_file()
    )
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x08
    f.write_bytes(bytes(raw))
    for read_latent in (True, False):  # latent mode decodes it; CoT mode checks it without decoding
        with pytest.raises(
            CorruptShard, match=rf"teacher 'teacher-a' shard-00000: array {array}: .*fails its crc32c check"
        ):
            sum(1 for _ in KVStream(store, ["teacher-a", "teacher-b"], shuffle_buffer=1, read_latent=read_latent))
    assert any(array in p.what and "crc32c" in p.what for p in verify(store))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a small tmpfs folder (root only; skipped elsewhere); unmounted after."""
    mounted = []

    def mount(size: str, *opts: str) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_while_writing_names_the_shard_path_and_leaves_no_shard(tmpfs):
    root = tmpfs("200k")
    store = root / "s.zarr"
    rng = np.random.default_rng(0)
    with (
        pytest.raises(OSError) as e,
        ShardWriter(store, "t", 0, num_layers=4, width=256, codec="float32", compression_level=0) as w,
    ):
        for j in range(400):
            w.write(
                f"s{j}", rng.normal(size=(64, 4, 256)), rng.normal(size=(64, 4, 256)), np.zeros(64), np.ones(64, bool)
            )
    assert e.value.errno == 28 and str(store / ".partial" / "t") in str(e.value.filename)
    assert not shard_is_complete(store, "t", 0) and not (store / "teachers" / "t" / shard_name(0)).exists()
    assert not (store / ".partial").exists()  # the attempt was discarded, freeing the space


def test_finalize_on_a_read_only_file_system_exits_5_naming_the_store(tiny_store, tmpfs, capsys):
    root = tmpfs("20m")
    shutil.copytree(tiny_store["store"], root / "s.zarr")
    (root / "s.zarr" / "index.parquet").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    assert main(["store", "finalize", str(root / "s.zarr")]) == 5
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"read-only file system at {root / 's.zarr'}" in err, err
    assert main(["store", "verify", str(root / "s.zarr"), "--no-progress"]) == 4  # reads fine; reports "not finalized"
    assert "not finalized" in capsys.readouterr().out
