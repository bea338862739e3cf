"""What the store promises about its own metadata, through the real CLI and the API (issue 24):

1. a complete shard makes a re-run a no-op only if it is what the re-run would write: another
   student, other data or another teacher is refused (exit 3) naming what differs and the fix;
2. a shard of another teacher setup copied over a finalized store is refused by `finalize` and
   by `train` (what `verify` calls stale), not consolidated into the store and trained on;
3. index.parquet (and the consolidated metadata) carry the checksums finalize recorded, and
   the trainer checks them and that every shard is in the index with the counts it records;
5. a flipped byte in index.parquet is data integrity (exit 4) naming it, for verify and train;
6. `verify` lists a truncated metadata file inside a shard as a problem (exit 4, naming it),
   and calls a folder that is not a store what finalize and train call it (exit 3)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_errors import one_line

from kvdistill.cli import DEBUG_HINT, ExitCode, main
from kvdistill.core.data import load_examples, write_jsonl
from kvdistill.schemas import DataSpec, DumpConfig, ModelSpec, SyntheticSpec
from kvdistill.store import StoreError, shard_name
from kvdistill.store.errors import CorruptShard
from kvdistill.store.layout import teacher_dir
from kvdistill.store.reader import read_index


def shard_dir(store: Path, teacher: str, shard: int) -> Path:
    return teacher_dir(store, teacher) / shard_name(shard)


def train_argv(tiny_store, store: Path, out: Path) -> list[str]:
    return [
        "train",
        "--store",
        str(store),
        "--student",
        tiny_store["student"].name_or_path,
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]


def dump_yaml(tiny_store, store: Path, tmp_path: Path) -> Path:
    """The config conftest dumped teacher-a shard 0 of tiny_store with, pointed at `store`."""
    cfg = DumpConfig(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
        shard=0,
    )
    return cfg.save(tmp_path / "dump.yaml")


def mtimes(d: Path) -> dict[str, int]:
    return {str(f.relative_to(d)): f.stat().st_mtime_ns for f in sorted(d.rglob("*"))}


# --- 1. a complete shard is a no-op only for the task that wrote it -----------------------------


@pytest.mark.parametrize("change", ["student", "data", "teacher", "nothing"])
def test_a_rerun_on_a_complete_shard_is_a_no_op_only_with_the_settings_it_was_dumped_with(
    tiny_store, store_copy, make_model, tmp_path, capsys, change
):
    config = dump_yaml(tiny_store, store_copy, tmp_path)
    before = mtimes(store_copy)
    extra = []
    if change == "student":  # another student: 3 layers, the store holds K/V for 2
        extra = ["--student", str(make_model("qwen2", layers=3, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1))]
    elif change == "data":
        rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=48, n_test=16, seed=5)))
        extra = ["--data", str(write_jsonl(rows, tmp_path / "other.jsonl"))]
    elif change == "teacher":  # teacher-a's geometry, other weights
        extra = ["--teacher", str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32, seed=7))]
    capsys.readouterr()  # making a model prints
    rc = main(["dump", "--config", str(config), *extra, "--no-progress"])
    out = capsys.readouterr()
    assert mtimes(store_copy) == before  # nothing written either way
    if change == "nothing":
        assert rc == 0, out.err
        assert "teacher teacher-a shard 0: already complete, nothing to do" in out.out
        return
    assert rc == ExitCode.BAD_INPUT == 3, out.out
    assert "already complete" not in out.out
    line = out.err.strip()
    assert "Traceback" not in line and "\n" not in line and line.startswith("kvdistill dump: "), line
    assert (
        "teacher teacher-a shard 0 of store" in line
        and "is complete, but was dumped with other settings than this run" in line
    )
    said = {
        "student": "geometry.num_layers: store has 2, this run has 3",
        "data": "data_fingerprint: store has",
        "teacher": "teacher spec fingerprint: store has",
    }[change]
    assert said in line, line
    fix = "--teacher-name, or into a new --store" if change == "teacher" else "or write into a new --store"
    assert fix in line, line


def test_a_stale_shard_is_not_a_no_op_for_the_task_it_does_not_match(tiny_store, stale_store, tmp_path, capsys):
    # The store's teacher spec is this run's; the shard (copied from another setup) is not.
    capsys.readouterr()
    assert (
        main(["dump", "--config", str(dump_yaml(tiny_store, stale_store, tmp_path)), "--no-progress"])
        == ExitCode.BAD_INPUT
    )
    line = one_line(capsys, "dump")
    assert "teacher fingerprint (weights, template, alignment, codec): shard has" in line
    assert f"or delete {shard_dir(stale_store, 'teacher-a', 0)} and run this task again" in line


# --- 2. a shard of another teacher setup, copied over ---------------------------------------------


@pytest.fixture
def stale_store(tiny_store, make_model, tmp_path) -> Path:
    """tiny_store with teacher-a's shard 0 replaced by one dumped from a teacher of the same
    geometry with other weights (same name, data, student): it reads like any other shard."""
    from kvdistill.dump.run import run_dump

    other = ModelSpec(
        name_or_path=str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32, seed=7)),
        name="teacher-a",
    )
    elsewhere = tmp_path / "elsewhere.zarr"
    run_dump(
        DumpConfig(
            teacher=other,
            student=tiny_store["student"],
            store=str(elsewhere),
            data=tiny_store["data"],
            num_shards=2,
            batch_size=8,
            device="cpu",
            shard=0,
        ),
        progress=False,
    )
    store = tmp_path / "stale.zarr"
    shutil.copytree(tiny_store["store"], store)
    shutil.rmtree(shard_dir(store, "teacher-a", 0))
    shutil.copytree(shard_dir(elsewhere, "teacher-a", 0), shard_dir(store, "teacher-a", 0))
    return store


def test_a_shard_of_another_teacher_setup_is_refused_by_finalize_and_train(tiny_store, stale_store, tmp_path, capsys):
    stale = "teacher 'teacher-a' shard-00000: stale: written by another teacher setup (fingerprint"
    capsys.readouterr()
    assert main(train_argv(tiny_store, stale_store, tmp_path / "run1")) == ExitCode.BAD_INPUT
    assert stale in one_line(capsys, "train")
    assert main(["store", "finalize", str(stale_store)]) == ExitCode.BAD_INPUT  # was: accepted
    line = one_line(capsys, "store")
    assert stale in line and "delete each of those shards and re-run its dump task" in line
    assert main(train_argv(tiny_store, stale_store, tmp_path / "run2")) == ExitCode.BAD_INPUT  # was: exit 0 on its K/V
    assert stale in one_line(capsys, "train")
    assert main(["store", "verify", str(stale_store), "--no-progress"]) == ExitCode.INTEGRITY
    assert "teacher 'teacher-a' shard-00000: stale: written by another teacher setup" in capsys.readouterr().out


def test_check_store_checks_the_shard_records_verify_checks(tiny_store, stale_store):
    from kvdistill.store.index import check_finalized

    check_finalized(tiny_store["store"])  # a sound store passes
    check_finalized(stale_store, ["teacher-b"])  # only the chosen teachers are checked
    with pytest.raises(StoreError, match=r"teacher 'teacher-a' shard-00000: stale: written by another teacher setup"):
        check_finalized(stale_store, ["teacher-a", "teacher-b"])


# --- 3. index.parquet: checksummed, and it must list every shard with the shard's own counts --------


def test_finalize_records_the_checksums_of_index_parquet_and_the_consolidated_metadata(tiny_store):
    store = tiny_store["store"]
    root = json.loads((store / "zarr.json").read_text())
    record = root["attributes"]["kvdistill"]["finalized"]
    data = (store / "index.parquet").read_bytes()
    assert record["index"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    canonical = json.dumps(root["consolidated_metadata"], sort_keys=True, separators=(",", ":")).encode()
    assert record["consolidated_sha256"] == hashlib.sha256(canonical).hexdigest()


def _rewrite_index(store: Path, how: str) -> None:
    """index.parquet without teacher-a's shard-0 rows ("gone"), with them relabelled as another
    teacher's ("relabelled") or as shard 1's ("moved"): a well-formed file."""
    rows = pq.read_table(store / "index.parquet").to_pylist()
    first = [r for r in rows if (r["teacher"], r["shard"]) == ("teacher-a", 0)]
    assert first
    if how == "gone":
        rows = [r for r in rows if r not in first]
    for r in first:
        r.update({"relabelled": {"teacher": "teacher-z"}, "moved": {"shard": 1}}.get(how, {}))
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(store / "index.parquet")), store / "index.parquet")


def _drop_checksums(store: Path) -> None:
    """As a store finalized before kvdistill recorded checksums."""
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["kvdistill"].pop("finalized", None)
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("how", ["gone", "relabelled", "moved"])
@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "older-store"])
def test_training_refuses_an_index_that_lost_or_relabelled_a_teachers_first_shard(
    tiny_store, store_copy, tmp_path, capsys, how, checksums
):
    _rewrite_index(store_copy, how)
    if not checksums:
        _drop_checksums(store_copy)
    rc = main(train_argv(tiny_store, store_copy, tmp_path / "run"))  # was: exit 0, trained on shard 1 alone (or twice)
    line = one_line(capsys, "train")
    if checksums:
        assert rc == ExitCode.INTEGRITY
        assert (
            f"{store_copy / 'index.parquet'} fails its checksum" in line
            and "changed since `kvdistill store finalize`" in line
        )
    else:
        assert rc == ExitCode.BAD_INPUT
        assert (
            "teacher 'teacher-a' shard-00000: index.parquet lists 0 samples / 0 rows" in line
            and "the shard records 24 /" in line
        )
        assert f"run `kvdistill store verify {store_copy}`" in line
    assert not (tmp_path / "run" / "final").exists()


def test_a_changed_consolidated_metadata_is_refused_by_train(tiny_store, store_copy, tmp_path, capsys):
    doc = json.loads((store_copy / "zarr.json").read_text())
    meta = doc["consolidated_metadata"]["metadata"]
    meta["teachers/teacher-b/shard-00001"]["attributes"]["kvdistill"]["rows"] += 1
    (store_copy / "zarr.json").write_text(json.dumps(doc))
    assert main(train_argv(tiny_store, store_copy, tmp_path / "run")) == ExitCode.INTEGRITY
    assert f"the consolidated metadata in {store_copy / 'zarr.json'} fails its checksum" in one_line(capsys, "train")
    assert main(["store", "finalize", str(store_copy)]) == 0  # the advice works
    capsys.readouterr()


# --- 5. a flipped byte in index.parquet --------------------------------------------------------------


def _flipped(data: bytes, off: int) -> bytes:
    out = bytearray(data)
    out[off] ^= 0x5A
    return bytes(out)


def _with_timeout(fn, seconds: float = 10.0):
    """fn()'s result or exception; fails the test if it does not return (pyarrow's dataset reader
    hangs on some corrupt files)."""
    got: dict = {}

    def run():
        try:
            got["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            got["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} hangs"
    if "error" in got:
        raise got["error"]
    return got["value"]


def test_read_index_decodes_a_flipped_index_parquet_or_refuses_it_naming_it(store_copy):
    f = store_copy / "index.parquet"
    data = f.read_bytes()
    decoded = 0
    for off in range(0, len(data), 3):  # every third byte: ~1,100 flips over every part of the file
        f.write_bytes(_flipped(data, off))
        try:  # what does not decode is CorruptShard naming the file: never another error, never a hang
            _with_timeout(lambda: read_index(store_copy, ["teacher-a", "teacher-b"]))
            decoded += 1
        except CorruptShard as e:
            assert str(e).startswith(
                f"{f} does not decode ("
            ) and "index.parquet is corrupt; run `kvdistill store finalize" in str(e)
    assert 0 < decoded < len(data) // 3  # both kinds were exercised


def test_the_trainers_check_refuses_every_flipped_byte_of_index_parquet(store_copy):
    from kvdistill.store.index import check_finalized

    f = store_copy / "index.parquet"
    data = f.read_bytes()
    for off in range(0, len(data), 3):
        f.write_bytes(_flipped(data, off))
        with pytest.raises(CorruptShard, match=f"{f} fails its checksum"):
            check_finalized(store_copy, ["teacher-a", "teacher-b"])


def _offsets(data: bytes) -> dict[str, int]:
    """A flip that the Parquet reader refuses ("undecodable"), and one it decodes into other
    index rows ("silent")."""
    orig = pq.read_table(pa.BufferReader(data))
    found: dict[str, int] = {}
    for off in range(len(data)):
        try:
            t = pq.ParquetFile(pa.BufferReader(_flipped(data, off))).read()
            t.column("sample_id").to_pylist()
            if not t.equals(orig):
                found.setdefault("silent", off)
        except Exception:  # noqa: BLE001 - any failure to decode
            found.setdefault("undecodable", off)
        if len(found) == 2:
            return found
    raise AssertionError(f"no flip of each kind: {found}")


@pytest.mark.parametrize("kind", ["undecodable", "silent"])
def test_a_flipped_byte_in_index_parquet_is_data_integrity_for_verify_and_train(
    tiny_store, store_copy, tmp_path, capsys, kind
):
    f = store_copy / "index.parquet"
    data = f.read_bytes()
    f.write_bytes(_flipped(data, _offsets(data)[kind]))
    assert main(["store", "verify", str(store_copy), "--no-progress"]) == ExitCode.INTEGRITY
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "index.parquet" in out, out
    assert (
        main(train_argv(tiny_store, store_copy, tmp_path / "run")) == ExitCode.INTEGRITY
    )  # was: 3 blaming the model, or 0
    line = one_line(capsys, "train")
    assert f"data integrity: store {store_copy}: {f}" in line, line


def test_verify_names_an_index_parquet_pyarrow_cannot_read(store_copy, capsys):
    from kvdistill.store.verify import verify

    f = store_copy / "index.parquet"
    f.write_bytes(f.read_bytes()[:-20] + b"\x0f" * 12 + f.read_bytes()[-8:])  # a mangled footer
    problems = verify(store_copy)
    assert [(p.teacher, p.shard) for p in problems] == [(None, None)]
    assert problems[0].what.startswith(f"{f} does not decode (")
    assert "finalize" in problems[0].fix


# --- 6. verify: a truncated metadata file is a problem; a folder that is no store is bad input -------


@pytest.mark.parametrize(
    "rel",
    [
        f"teachers/teacher-a/{shard_name(0)}/k/zarr.json",
        f"teachers/teacher-b/{shard_name(1)}/offsets/zarr.json",
        f"teachers/teacher-a/{shard_name(1)}/zarr.json",
        "tokenizers/student/zarr.json",
    ],
)
def test_verify_lists_a_truncated_zarr_json_as_a_problem_naming_it(store_copy, capsys, rel):
    f = store_copy / rel
    f.write_text(f.read_text()[:40])
    assert (
        main(["store", "verify", str(store_copy), "--no-progress"]) == ExitCode.INTEGRITY
    )  # was: 3, naming no file (or 0)
    out, err = capsys.readouterr()
    assert f"{f}: not valid JSON (" in out, out
    assert err.strip().startswith("kvdistill store: verify found ") and "Traceback" not in err


def test_verify_keeps_listing_after_a_truncated_array_metadata(store_copy):
    from kvdistill.store.verify import verify

    for rel in (
        f"teachers/teacher-a/{shard_name(0)}/v/zarr.json",
        f"teachers/teacher-b/{shard_name(1)}/sample_ids/zarr.json",
    ):
        (store_copy / rel).write_text("{")
    found = {(p.teacher, p.shard) for p in verify(store_copy)}
    assert found == {("teacher-a", 0), ("teacher-b", 1)}


def test_a_folder_that_is_not_a_store_is_bad_input_for_verify_finalize_and_train(tiny_store, tmp_path, capsys):
    folder = tmp_path / "not-a-store"
    folder.mkdir()
    said = f"StoreError: {folder} is not a kvdistill store (no zarr.json); run `kvdistill dump` first"
    for argv in (["store", "verify", str(folder), "--no-progress"], ["store", "finalize", str(folder)]):
        assert main(argv) == ExitCode.BAD_INPUT, argv  # verify was 4
        assert one_line(capsys, "store") == f"kvdistill store: {said} {DEBUG_HINT}"
    assert main(train_argv(tiny_store, folder, tmp_path / "run")) == ExitCode.BAD_INPUT
    assert one_line(capsys, "train") == f"kvdistill train: {said} {DEBUG_HINT}"
