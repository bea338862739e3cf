"""jobs/accelerate/fsdp.yaml on 2 CPU processes (gloo), through `accelerate launch --config_file`.

What happens there, pinned: accelerate does not shard on the CPU. Its AcceleratorState turns
`distributed_type: FSDP` (ACCELERATE_USE_FSDP=true) into DistributedType.FSDP only for
accelerator process groups (MULTI_GPU / NPU / XPU / HPU / ...); a CPU process group stays
MULTI_CPU and Accelerator.prepare wraps the model in DistributedDataParallel, without a word.
(torch itself shards on the CPU: `fully_shard` over gloo works; it is accelerate that does not
take that path; `use_cpu: true` in the config changes nothing.) So the run is DDP, and ends
bit for bit where the 2-process DDP run does; its RUN/final is a plain Hugging Face checkpoint.

If accelerate starts sharding on the CPU, the first assertion fails: then compare the sharded
run with DDP (torch.testing.assert_close, rtol 1e-5, atol 1e-6: a reduce-scatter sums in
another order than DDP's all-reduce) and update README's FSDP paragraph."""

from __future__ import annotations

import json
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
    train_args,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow  # two 2-process runs through accelerate launch

STEPS = 3


def _cpu_fsdp_config(dest):
    """The shipped GPU config with what the CPU needs: 2 processes, no bf16 autocast."""
    cfg = yaml.safe_load((ROOT / "jobs" / "accelerate" / "fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"  # the tiny student's layer
    cfg.update(num_processes=2, mixed_precision="no")
    dest.write_text(yaml.safe_dump(cfg))
    return dest


def test_the_fsdp_config_on_two_cpu_processes_runs_unsharded_like_ddp_and_saves_a_loadable_student(tiny_store, tmp_path):
    env = launch_env()
    t0 = time.monotonic()
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run(
        [*ACCELERATE, "--config_file", str(_cpu_fsdp_config(tmp_path / "fsdp-cpu.yaml")), "--main_process_port", str(free_port()),
         *train_args(tiny_store, fsdp, STEPS)],
        tmp_path / "fsdp.log", env,
    )
    t1 = time.monotonic()
    run(
        [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), *train_args(tiny_store, ddp, STEPS)],
        tmp_path / "ddp.log", env,
    )
    t2 = time.monotonic()

    ranks = [json.loads((fsdp / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.MULTI_CPU"] * 2, (
        f"accelerate now runs FSDP on the CPU ({ranks[0]['distributed_type']}): make this test compare the sharded run "
        "with DDP (assert_close rtol 1e-5, atol 1e-6) and update the README's FSDP paragraph"
    )
    # Unsharded, it is DDP: the same weights bit for bit, not merely close.
    worst, bitwise = compare_weights(final_weights(fsdp), final_weights(ddp), rtol=0, atol=0)
    assert bitwise and worst == 0.0
    assert [json.loads(line)["step"] for line in (fsdp / "metrics.jsonl").open()][-1] == STEPS

    # RUN/final is a plain Hugging Face checkpoint: every weight loads, and it runs a forward.
    model, info = AutoModelForCausalLM.from_pretrained(fsdp / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(fsdp / "final")
    ids = tok("Question: what is 2 + 3?\nReasoning:\n", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    print(f"fsdp config on CPU: {ranks[0]['distributed_type']} (unsharded), weights == DDP bit for bit; "
          f"fsdp-config run {t1 - t0:.1f} s, DDP run {t2 - t1:.1f} s")
