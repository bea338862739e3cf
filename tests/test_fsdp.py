"""jobs/accelerate/fsdp.yaml on 2 CPU processes (gloo), through `accelerate launch --config_file`.

accelerate (1.16) does not shard on the CPU: its AcceleratorState turns `distributed_type: FSDP`
(ACCELERATE_USE_FSDP=true) into DistributedType.FSDP only for accelerator process groups
(MULTI_GPU / NPU / XPU / HPU / ...); a CPU process group stays MULTI_CPU, and Accelerator.prepare
would wrap the model in DDP without a word. The trainer refuses that run (train/loop.py
`_check_fsdp`): each rank prints one line and exits 2, before it writes anything.

torch itself shards on the CPU (`fully_shard` over gloo works), so the second test patches
accelerate in the launched processes to take its FSDP branch for MULTI_CPU too, and runs the
trainer's FSDP2 path (sharded prepare, full-state-dict gather, save of RUN/final) on the CPU."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
import yaml
from launch import (
    ACCELERATE,
    ROOT,
    compare_weights,
    final_weights,
    free_port,
    launch_env,
    run,
    start,
    train_args,
    wait_all,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow  # 2-process runs through accelerate launch

STEPS = 3
REFUSED = "accelerate launch asked for FSDP, but this run is MULTI_CPU"
FSDP_CPU = ROOT / "tests" / "fsdp_cpu"  # sitecustomize.py: accelerate shards on the CPU


def _cpu_fsdp_config(dest):
    """The shipped GPU config with what the CPU needs: 2 processes, no bf16 autocast."""
    cfg = yaml.safe_load((ROOT / "jobs" / "accelerate" / "fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"  # the tiny student's layer
    cfg.update(num_processes=2, mixed_precision="no")
    dest.write_text(yaml.safe_dump(cfg))
    return dest


def _fsdp_cmd(tiny_store, tmp_path, out, *launch_args, train_extra=()):
    return [
        *ACCELERATE,
        "--config_file",
        str(_cpu_fsdp_config(tmp_path / "fsdp-cpu.yaml")),
        "--main_process_port",
        str(free_port()),
        *launch_args,
        *train_args(tiny_store, out, STEPS, *train_extra),
    ]


def test_the_fsdp_config_on_two_cpu_processes_is_refused_with_one_line_by_each_rank(tiny_store, tmp_path):
    """Plain accelerate makes the run MULTI_CPU (DDP): every rank refuses it, exit code 2, one
    line on its stderr, no traceback, nothing written."""
    out, log, rank_logs = tmp_path / "fsdp", tmp_path / "fsdp.log", tmp_path / "rank-logs"
    t0 = time.monotonic()
    # --log_dir / --tee 3: each rank's stdout and stderr also go to files of their own
    # (RANK_LOGS/<run id>/attempt_0/<rank>/std{out,err}.log), apart from the launcher's output.
    proc = start(_fsdp_cmd(tiny_store, tmp_path, out, "--log_dir", str(rank_logs), "--tee", "3"), log, launch_env())
    code = wait_all({"fsdp": proc}, {"fsdp": log}, timeout=120)["fsdp"]
    text = log.read_text()
    assert code != 0, text[-3000:]

    # the launcher (torch elastic) reports each rank's exit code
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text))
    # The first rank to refuse makes the launcher SIGTERM the other (-15) unless it refused too.
    assert set(codes) == {"0", "1"} and set(codes.values()) <= {"2", "-15"} and "2" in codes.values(), text[-3000:]
    for rank in (r for r in (0, 1) if codes[str(r)] == "2"):
        [attempt] = rank_logs.glob(f"*/attempt_0/{rank}")
        err = (attempt / "stderr.log").read_text()
        assert err.count("\n") == 1 and err.startswith(f"kvdistill train: config error: {REFUSED}: "), err
        assert "Traceback" not in err and "Traceback" not in (attempt / "stdout.log").read_text()
        assert (
            f"[default{rank}]:kvdistill train: config error: {REFUSED}: " in text
        )  # and the launcher's output shows it
    assert not (out / "final").exists() and not (out / "ranks").exists()
    print(
        f"fsdp config on CPU, plain accelerate: ranks exit {codes}, launcher exit {code};"
        f" {time.monotonic() - t0:.1f} s"
    )


def test_the_trainers_fsdp2_path_on_cpu_with_accelerate_patched_to_shard_matches_ddp_and_saves_a_loadable_student(
    tiny_store, tmp_path
):
    """This test PATCHES ACCELERATE to exercise the trainer's FSDP2 path on the CPU; on GPUs the
    path to FSDP is accelerate's own, unpatched.

    Why: accelerate 1.16 never makes a CPU (gloo) run FSDP, while torch's `fully_shard` works
    over gloo; without the patch, the FSDP code of the trainer (the sharded model through
    prepare, gradient sync by reduce-scatter, the FULL_STATE_DICT gather of a tied student for
    RUN/final) would run only on GPU machines, which the test suite does not have.
    tests/fsdp_cpu/sitecustomize.py, first on PYTHONPATH of the launched processes only (never
    imported by this test process or the product), wraps AcceleratorState.__init__: a MULTI_CPU
    state with ACCELERATE_USE_FSDP=true becomes DistributedType.FSDP with the FSDP plugin that
    Accelerator.__init__ built from the environment, as accelerate does for GPUs.

    Sharded, the run is not DDP bit for bit (a reduce-scatter sums in another order than DDP's
    all-reduce), but it trains 3 steps to the weights of the 2-process DDP run within rtol 1e-5,
    atol 1e-6 (max |diff| 6e-8 when written), and its RUN/final is a plain Hugging Face
    checkpoint."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    pythonpath = os.pathsep.join(p for p in (str(FSDP_CPU), os.environ.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    # --hash-params: each rank hashes the gathered parameters (param_hash's DTensor path)
    run(
        _fsdp_cmd(tiny_store, tmp_path, fsdp, train_extra=["--hash-params"]),
        tmp_path / "fsdp.log",
        launch_env(PYTHONPATH=pythonpath),
        timeout=150,
    )
    t1 = time.monotonic()
    run(
        [
            *ACCELERATE,
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *train_args(tiny_store, ddp, STEPS),
        ],
        tmp_path / "ddp.log",
        launch_env(),
        timeout=150,
    )
    t2 = time.monotonic()

    ranks = [json.loads((fsdp / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.FSDP"] * 2, ranks
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # both ranks gather the same whole model
    assert [json.loads((ddp / "ranks" / f"rank-{i}.json").read_text())["distributed_type"] for i in range(2)] == [
        "DistributedType.MULTI_CPU"
    ] * 2
    assert [json.loads(line)["step"] for line in (fsdp / "metrics.jsonl").open()][-1] == STEPS
    worst, bitwise = compare_weights(final_weights(fsdp), final_weights(ddp), rtol=1e-5, atol=1e-6)

    # RUN/final is a plain Hugging Face checkpoint: every weight loads, and it runs a forward.
    model, info = AutoModelForCausalLM.from_pretrained(fsdp / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(fsdp / "final")
    ids = tok("Question: what is 2 + 3?\nReasoning:\n", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    print(
        f"fsdp on CPU (accelerate patched): FSDP on both ranks; weights vs DDP after {STEPS} steps: max |diff|"
        f" {worst:.3g} (bit for bit: {bitwise}); FSDP run {t1 - t0:.1f} s, DDP run {t2 - t1:.1f} s"
    )
