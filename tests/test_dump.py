"""The dump task: never truncates silently, partitions identically, refuses what it cannot align."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvdistill import tiny
from kvdistill.data import load_examples
from kvdistill.dump.prompts import encode
from kvdistill.dump.run import partition, run_dump
from kvdistill.schemas import DEFAULT_TEMPLATE, DataSpec, DumpConfig, ModelSpec, SyntheticSpec
from kvdistill.store import ShardReader


def _cfg(tiny_store, tmp_path, **kw) -> DumpConfig:
    base = dict(teacher=tiny_store["teachers"][0], student=tiny_store["student"], store=str(tmp_path / "s.zarr"), data=tiny_store["data"], batch_size=8, device="cpu", kv_dtype="float32")
    return DumpConfig(**{**base, **kw})


def test_a_sample_over_max_len_is_an_error_naming_it_and_the_fix(tiny_store, tmp_path):
    with pytest.raises(ValueError, match=r"sample synth-train-\d+ has \d+ tokens > max_len 30; raise --max-len"):
        run_dump(_cfg(tiny_store, tmp_path, max_len=30), progress=False)
    assert not (tmp_path / "s.zarr" / "teachers" / "teacher-a" / "shard-00000").exists()


def test_skipping_long_samples_is_explicit_and_counted(tiny_store, tmp_path):
    rows = load_examples(tiny_store["data"])
    tok = AutoTokenizer.from_pretrained(tiny_store["student"].name_or_path)
    lengths = sorted(len(encode(tok, DEFAULT_TEMPLATE, ex)) for ex in rows)
    limit = lengths[len(lengths) // 2]  # about half the rows are longer
    result = run_dump(_cfg(tiny_store, tmp_path, max_len=limit, on_too_long="skip"), progress=False)
    reader = ShardReader(tmp_path / "s.zarr", "teacher-a", 0)
    assert result.skipped and len(result.skipped) + result.samples == len(rows)
    assert reader.attrs["skipped"] == result.skipped
    assert set(reader.sample_ids).isdisjoint(result.skipped)
    assert 0 < (reader.offsets[1:] - reader.offsets[:-1]).max() <= limit
    assert f"skipped {len(result.skipped)}" in result.summary()


def test_partition_is_contiguous_disjoint_and_covers_every_row(examples):
    for n in (1, 3, 7, 48, 60):
        parts = [partition(examples, i, n) for i in range(n)]
        assert [e.id for p in parts for e in p] == [e.id for e in examples]
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_teacher_with_another_tokenizer_is_refused_until_cross_tokenizer_alignment(tiny_store, tmp_path):
    rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=50, n_test=5, seed=9)))
    tok = tiny.train_tokenizer(tiny.corpus(rows, DEFAULT_TEMPLATE), vocab_size=290)
    other = tiny.save(tiny.build_model("llama", tok, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16), tok, tmp_path / "other")
    with pytest.raises(NotImplementedError, match="tokenizer or prompt template differs"):
        run_dump(_cfg(tiny_store, tmp_path, teacher=ModelSpec(name_or_path=str(other))), progress=False)
    odd = ModelSpec(name_or_path=tiny_store["teachers"][0].name_or_path, prompt_template="Q: {question}\nA: {reasoning} => {answer}")
    with pytest.raises(NotImplementedError, match="prompt template"):
        run_dump(_cfg(tiny_store, tmp_path, teacher=odd), progress=False)
