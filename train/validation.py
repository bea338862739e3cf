"""Validation during training: every `eval_steps` steps the active loss terms on held-out
data (the store's last `val_shards` shards, or a second store `val_store`), and RUN_DIR/best,
the model at the step with the lowest `metric_for_best_model`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.store import open_specs

from .checkpoint import save_complete
from .mode import Mode
from .quant import kv_as_stored
from .stream import KVStream, train_loader
from .student import check_store, save_student

__all__ = ["validation_loader", "validate", "Best"]


def validation_loader(
    cfg: TrainConfig,
    mode: Mode,
    tokenizer,
    student,
    teachers: list[str],
    val_shards: list[int],
    accelerator,
    pad_id: int,
):
    """Batches of the held-out data, in store order, with the true teacher K/V (no control):
    global batches of batch_size x processes split across ranks like training's, so every rank
    runs the same number of batches. A val_store holding the training data (the same path, or
    the same data fingerprint) is refused: it would validate on what is trained on."""
    store = cfg.val_store or cfg.store
    if cfg.val_store:
        val_spec, _ = check_store(cfg, tokenizer, student, cfg.val_store)  # same tokenizer, geometry and teachers
        train_spec, _ = open_specs(cfg.store)
        same = Path(cfg.val_store).resolve() == Path(cfg.store).resolve()
        if same or val_spec.data_fingerprint == train_spec.data_fingerprint:
            why = (
                "is the training store"
                if same
                else f"holds the training store's data (data fingerprint {val_spec.data_fingerprint})"
            )
            raise ConfigError(
                f"TrainConfig.val_store: {cfg.val_store} {why}, so validation would measure samples the run trains on;"
                " hold out the training store's last shards with --val-shards N instead, or dump a held-out split"
                " into a second store"
            )
    stream = KVStream(
        store,
        teachers,
        seed=cfg.seed,
        shuffle_buffer=1,
        read_kv=mode.read_kv,
        read_latent=mode.read_latent,
        read_logits=mode.read_logits,
        kv_as_stored=kv_as_stored(cfg.kv_transfer, accelerator.device),
        shards=None if cfg.val_store else val_shards,
    )
    return train_loader(
        stream,
        dataclasses.replace(cfg, kv_control="none"),
        pad_id,
        mode.control,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        accumulation=1,
    )


def validate(mode: Mode, model, loader, accelerator, step: int, max_batches: int | None) -> dict[str, float]:
    """{"val_<term>": mean over the held-out batches (each term weighted by what it averages
    over), "val_loss"} for every scalar term, reduced over ranks. Every rank runs the same
    number of batches (the loader splits each global batch across them; a rank with no sample
    left runs a weightless stand-in), so the collective forwards of DDP / FSDP line up. Terms
    over a whole batch (CKA) are each batch's, weighted by its tokens."""
    loader.dataset.set_epoch(0)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            losses = mode.step(model, batch, accelerator.device, step, None)
            counts = {u: c * batch["weight"] for u, c in mode.counts(batch).items()}
            for k, v in losses.items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:
                    w = counts["samples"] if k == "loss" else counts[mode.unit_of(k)]
                    sums[k] = sums.get(k, 0.0) + w * v.item()
                    weights[k] = weights.get(k, 0.0) + w
    model.train()
    keys = sorted(sums)
    if accelerator.num_processes > 1:
        both = torch.tensor(
            [[sums[k] for k in keys], [weights[k] for k in keys]], dtype=torch.float64, device=accelerator.device
        )
        both = accelerator.reduce(both, reduction="sum").cpu()
        sums, weights = dict(zip(keys, both[0].tolist(), strict=True)), dict(zip(keys, both[1].tolist(), strict=True))
    return {f"val_{k}": round(sums[k] / weights[k], 6) for k in keys if weights[k] > 0}


class Best:
    """RUN_DIR/best: the model at the step with the lowest `metric` so far (best.json says
    which), saved like RUN_DIR/final."""

    def __init__(self, metric: str | None, value: float = math.inf, step: int | None = None) -> None:
        self.metric, self.value, self.step = metric, value, step

    @classmethod
    def resume(cls, out: Path, cfg: TrainConfig) -> Best:
        path = out / "best" / "best.json"
        if not cfg.metric_for_best_model or not path.exists():
            return cls(cfg.metric_for_best_model)
        got = json.loads(path.read_text())
        return cls(cfg.metric_for_best_model, got["value"], got["step"])

    def improves(self, row: dict[str, Any]) -> bool:
        if not self.metric:
            return False
        if self.metric not in row:
            raise ConfigError(
                f"metric_for_best_model {self.metric!r} is not among the validation metrics"
                f" {sorted(k for k in row if k.startswith('val_'))}"
            )
        return row[self.metric] < self.value

    def save(
        self, accelerator, model, cfg: TrainConfig, tokenizer, mode: Mode, out: Path, step: int, row: dict[str, Any]
    ) -> None:
        """Into .best.partial, renamed over RUN_DIR/best once complete (`save_complete`)."""
        self.value, self.step = row[self.metric], step

        def write(partial: Path) -> None:
            save_student(accelerator, model, cfg, tokenizer, partial, mode.save_extra)
            if accelerator.is_main_process:
                (partial / "best.json").write_text(
                    json.dumps({"metric": self.metric, "value": self.value, "step": step})
                )

        save_complete(accelerator, out / "best", "the best model", write)

    def summary(self) -> dict[str, Any]:
        if not self.metric or self.step is None:
            return {}
        return {"best_metric": self.metric, "best_value": self.value, "best_step": self.step}
