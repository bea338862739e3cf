"""Real 2-process CPU DDP (gloo) through `accelerate launch` on our CLI: ranks read disjoint
shards and end with identical parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # two processes through accelerate launch


def test_two_process_cpu_ddp_reads_disjoint_shards_and_keeps_parameters_in_sync(tiny_store, tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed beside this python")
    out = tmp_path / "ddp"
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "kvdistill", "train", "--store", str(tiny_store["store"]), "--student", tiny_store["student"].name_or_path,
        "--out", str(out), "--max-steps", "6", "--per-device-train-batch-size", "4", "--device", "cpu", "--no-progress", "--hash-params",
        "--eval-steps", "3", "--val-store", str(tiny_store["store"]),  # each rank validates on its shard; results reduced
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"])
    assert sorted(ranks[0]["shards"] + ranks[1]["shards"]) == [0, 1]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # gradients were all-reduced
    assert (out / "final" / "config.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert rows[-1]["step"] == 6
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6] and all(r["val_kv_k"] > 0 for r in rows if "val_loss" in r)
