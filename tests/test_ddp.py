"""Real 2-process CPU DDP (gloo) through `accelerate launch` on our CLI: N processes train
exactly what one process trains (the same samples per step, the same LR at every step, the
same weights and logged terms), and a checkpoint resumes on the same or another number of
processes, each sample of each epoch trained exactly once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from launch import launch_env
from test_equivalence import _cfg, assert_same_run, final_weights, metrics, samples_by_step

from kvdistill.core.data import load_examples
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import DataSpec, DumpConfig, SyntheticSpec
from kvdistill.store import ShardReader, finalize
from kvdistill.train.loop import train

pytestmark = pytest.mark.slow  # two processes through accelerate launch

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
# 41 samples in 2 shards of unequal size (21 / 20); global batch 8: 5 whole steps and one of a
# single sample an epoch (rank 1 then runs a weightless stand-in), 10 steps cross into epoch 1.
ODD = DataSpec(synthetic=SyntheticSpec(n_train=41, n_test=8, seed=3))


@pytest.fixture(scope="module")
def odd_store(tiny_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("odd") / "odd.zarr"
    base = DumpConfig(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(store),
        data=ODD,
        num_shards=2,
        batch_size=8,
        device="cpu",
    )
    run_local(dump_tasks(base, tiny_store["teachers"]), progress=False)
    finalize(store)
    sizes = [len(ShardReader(store, "teacher-a", i)) for i in range(2)]
    assert sizes[0] != sizes[1] and sum(sizes) == 41
    return {**tiny_store, "store": store, "data": ODD}


def _launch(store, out, *flags: str) -> None:
    cmd = [
        *LAUNCH,
        "-m",
        "kvdistill",
        "train",
        "--store",
        str(store["store"]),
        "--student",
        store["student"].name_or_path,
        "--out",
        str(out),
        "--warmup-steps",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--shuffle-buffer",
        "16",
        "--record-samples",
        "--no-progress",
        *flags,
    ]
    done = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def two(odd_store, tmp_path_factory):
    """The uninterrupted 2-process run (batch 4 a process), a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    _launch(odd_store, out, "--max-steps", "10", "--batch-size", "4", "--save-every", "3", "--hash-params")
    return out


def test_two_processes_x_batch_4_train_what_one_process_x_batch_8_and_4_x_2_accumulation_train(
    odd_store, two, tmp_path
):
    ranks = [json.loads((two / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2] and all(
        r["distributed_type"].endswith("MULTI_CPU") for r in ranks
    )
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # gradients were all-reduced
    per_rank = [
        [
            i
            for line in (two / "ranks" / f"samples-rank-{r}.jsonl").read_text().splitlines()
            for i in json.loads(line)["sample_ids"]
        ]
        for r in range(2)
    ]
    assert not set(per_rank[0][:20]) & set(per_rank[1][:20])  # the ranks split each global batch
    for name, kw in (("b8", {"batch_size": 8}), ("b4x2", {"batch_size": 4, "gradient_accumulation_steps": 2})):
        train(_cfg(odd_store, tmp_path / name, **kw), progress=False)
        assert_same_run(two, tmp_path / name)
    lrs = [r["lr"] for r in metrics(two)]
    assert lrs[1] == max(lrs) and lrs[1:] == sorted(
        lrs[1:], reverse=True
    )  # warm-up, then one cosine decay: never back up


def _epochs(*runs) -> dict[int, list[str]]:
    """Every sample id trained, per epoch, over the runs' sample records (a run and its resumption)."""
    out: dict[int, list[str]] = {}
    for run in runs:
        for path in sorted((run / "ranks").glob("samples-rank-*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                out.setdefault(row["epoch"], []).extend(row["sample_ids"])
    return out


def _head(run, dest, step: int):
    """A copy of `run` as it stood after `step`: its checkpoint and the sample records up to it."""
    shutil.copytree(run / "checkpoints" / f"step-{step:07d}", dest / "checkpoints" / f"step-{step:07d}")
    (dest / "ranks").mkdir(parents=True)
    rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    for path in (run / "ranks").glob("samples-rank-*.jsonl"):
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= step]
        (dest / "ranks" / path.name).write_text("".join(r + "\n" for r in rows))
    return dest


def _each_sample_once_per_epoch(store, *runs) -> None:
    ids = sorted(ex.id for ex in load_examples(store["data"]))
    epochs = _epochs(*runs)
    assert sorted(epochs[0]) == ids  # epoch 0: every sample exactly once
    assert len(set(epochs[1])) == len(epochs[1]) == 4 * 8 and set(epochs[1]) <= set(
        ids
    )  # steps 7-10: 4 whole global batches


def test_a_mid_epoch_checkpoint_resumes_bitwise_on_two_processes_and_on_one(odd_store, two, tmp_path):
    resumed = _head(two, tmp_path / "two-two", 3)
    _launch(odd_store, resumed, "--max-steps", "10", "--batch-size", "4", "--resume", "auto")
    assert final_weights(resumed).keys() == final_weights(two).keys()
    assert all((final_weights(resumed)[k] == v).all() for k, v in final_weights(two).items())  # bit for bit
    _each_sample_once_per_epoch(odd_store, resumed)
    one = _head(two, tmp_path / "two-one", 3)
    train(_cfg(odd_store, one, batch_size=8, resume="auto"), progress=False)  # 2 x 4 -> 1 x 8
    assert_same_run(two, one)
    _each_sample_once_per_epoch(odd_store, one)


def test_a_one_process_checkpoint_resumes_on_two(odd_store, tmp_path):
    single = tmp_path / "one"
    train(_cfg(odd_store, single, batch_size=8, save_every=4), progress=False)
    resumed = _head(single, tmp_path / "one-two", 4)
    _launch(odd_store, resumed, "--max-steps", "10", "--batch-size", "4", "--resume", "auto")  # 1 x 8 -> 2 x 4
    assert_same_run(single, resumed)
    _each_sample_once_per_epoch(odd_store, resumed)
    assert samples_by_step(resumed) == samples_by_step(single)
