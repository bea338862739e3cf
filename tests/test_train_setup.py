"""The setup every trainer entry point shares: one device rule (`resolve_device`), and the run
summary's loss figures from a History that keeps the first row, the last rows, and no more."""

from __future__ import annotations

import pytest
import torch

from kvdistill.core.models import resolve_device
from kvdistill.schemas import ConfigError, ModelSpec, TrainConfig
from kvdistill.train import loop
from kvdistill.train.loop import SUMMARY_WINDOW, History, summary_terms

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are of CUDA where torch sees none")


@no_cuda
def test_one_device_rule_auto_is_the_cpu_without_a_gpu_and_cuda_there_is_refused_naming_the_fix():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {asked}: torch sees no CUDA device here; use --device cpu"):
            resolve_device(asked)
    with pytest.raises(ConfigError, match="--device 'gpu': not a device .*use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_train_refuses_a_gpu_index_that_accelerate_would_ignore(monkeypatch):
    """accelerate puts each process on its local rank's GPU: --device cuda:1 would train on cuda:0."""
    monkeypatch.setattr(loop, "resolve_device", lambda device: torch.device(device))  # as on a machine with 2 GPUs
    cfg = TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", device="cuda:1")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        loop._device(cfg)
    assert (
        loop._device(TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", device="cuda")).type
        == "cuda"
    )


def _summary_of_every_row(rows: list[dict], terms: dict[str, str]) -> dict:
    """The summary as computed from the whole list of rows (what the trainer kept before)."""
    tail = rows[-SUMMARY_WINDOW:]
    out = {f"mean_last_{SUMMARY_WINDOW}_over": len(tail)}
    for name, key in terms.items():
        vals = [r[key] for r in tail if key in r]
        logged = [r[key] for r in rows if key in r]
        out[f"last_{name}"] = logged[-1] if logged else None
        out[f"mean_last_{SUMMARY_WINDOW}_{name}"] = sum(vals) / len(vals) if vals else None
        out[f"first_{name}"] = logged[0] if logged else None
    return out


@pytest.mark.parametrize("n", [0, 1, 5, SUMMARY_WINDOW, SUMMARY_WINDOW + 1, 500])
def test_history_gives_the_summary_of_every_row_while_holding_a_fixed_number(n):
    # kv_k from row 3 on and z only in the first rows: a key's first and last value are not the first / last row's
    rows = [
        {"step": i + 1, "ce": 1.0 / (i + 1), **({"kv_k": i * 0.5} if i >= 3 else {}), **({"z": -i} if i < 4 else {})}
        for i in range(n)
    ]
    terms = {"ce": "ce", "kv_k": "kv_k", "z": "z", "never": "never"}
    history = History()
    for row in rows:
        history.append(row)
    assert summary_terms(history, terms) == _summary_of_every_row(rows, terms)
    assert len(history.tail) == min(n, SUMMARY_WINDOW)
