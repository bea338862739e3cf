"""The dump task: never truncates silently, partitions identically, refuses what it cannot align."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvdistill.align.layers import apply_layer_map
from kvdistill.align.time import char_overlap_time_map
from kvdistill.core.capture import forward_kv
from kvdistill.core.data import load_examples
from kvdistill.core.prompts import encode
from kvdistill.dump.run import partition, run_dump
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import (
    DEFAULT_TEMPLATE,
    AlignSpec,
    ConfigError,
    DumpConfig,
    ModelSpec,
    TrainConfig,
)
from kvdistill.store import ShardReader, StoreError, finalize, inspect, read_teacher_specs
from kvdistill.train.loop import train


def _cfg(tiny_store, tmp_path, **kw) -> DumpConfig:
    base = dict(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(tmp_path / "s.zarr"),
        data=tiny_store["data"],
        batch_size=8,
        device="cpu",
        kv_dtype="float32",
    )
    return DumpConfig(**{**base, **kw})


def test_a_sample_over_max_len_is_an_error_naming_it_and_the_fix(tiny_store, tmp_path):
    with pytest.raises(
        ValueError, match=r"sample synth-train-\d+ has \d+ teacher / \d+ student tokens > max_len 30; raise --max-len"
    ):
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


THINK = "Solve it step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\nFinal answer: {answer}"


def _teacher_kv(path: str, template: str, ex, layer_map) -> torch.Tensor:
    """The teacher's own K [T_t, L_s, D] for one sample, layer-mapped (independent of the dump)."""
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    e = encode(tok, template, ex)
    ids = torch.as_tensor(e.input_ids, dtype=torch.long)[None]
    with torch.no_grad():
        k, _ = forward_kv(model, ids, torch.ones_like(ids))
    return apply_layer_map(torch.tensor(layer_map, dtype=torch.float64), k[0]), e


def test_cross_tokenizer_teacher_is_char_overlap_aligned_onto_every_student_token(
    tiny_store, tmp_path, other_tokenizer_teacher
):
    teacher = ModelSpec(name_or_path=str(other_tokenizer_teacher), name="other-tok")
    run_dump(_cfg(tiny_store, tmp_path, teacher=teacher, num_shards=1), progress=False)
    spec = read_teacher_specs(tmp_path / "s.zarr")["other-tok"]
    assert spec.time_map == "char_overlap"
    reader = ShardReader(tmp_path / "s.zarr", "other-tok", 0)
    s_tok = AutoTokenizer.from_pretrained(tiny_store["student"].name_or_path)
    by_id = {ex.id: ex for ex in load_examples(tiny_store["data"])}
    for j, sid in enumerate(reader.sample_ids):
        rows = reader.rows(int(reader.offsets[j]), int(reader.offsets[j + 1]), ("input_ids", "k"))
        student = encode(s_tok, DEFAULT_TEMPLATE, by_id[sid])
        assert np.array_equal(rows["input_ids"], student.input_ids)  # the time axis is the student's
        assert rows["k"].shape == (len(student), 2, 16)
    # One sample against an independent computation: K_s = A @ K_t with A from the two tokenizations.
    sid = reader.sample_ids[0]
    k_t, t_enc = _teacher_kv(str(other_tokenizer_teacher), DEFAULT_TEMPLATE, by_id[sid], spec.layer_map)
    s_enc = encode(s_tok, DEFAULT_TEMPLATE, by_id[sid])
    assert len(t_enc) != len(s_enc) or not np.array_equal(t_enc.input_ids, s_enc.input_ids)
    expected = torch.einsum("st,tld->sld", char_overlap_time_map(s_enc.offsets, t_enc.offsets).dense(), k_t.double())
    got = reader.rows(0, int(reader.offsets[1]), ("k",))["k"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)


def test_training_runs_on_a_cross_tokenizer_and_dual_prompt_store(tiny_store, tmp_path, other_tokenizer_teacher):
    store = str(tmp_path / "s.zarr")
    plain = tiny_store["teachers"][0]
    think = ModelSpec(name_or_path=plain.name_or_path, name="teacher-a-think", prompt_template=THINK)
    other = ModelSpec(name_or_path=str(other_tokenizer_teacher), name="other-tok")
    for t in (plain, think, other):
        for shard in range(2):
            run_dump(_cfg(tiny_store, tmp_path, teacher=t, num_shards=2, shard=shard), progress=False)
    finalize(store)
    specs = read_teacher_specs(store)
    assert {n: s.time_map for n, s in specs.items()} == {
        "teacher-a": "identity",
        "teacher-a-think": "segment_linear",
        "other-tok": "char_overlap",
    }
    summary = train(
        TrainConfig(
            store=store,
            student=tiny_store["student"],
            out=str(tmp_path / "run"),
            batch_size=8,
            max_steps=4,
            warmup_steps=1,
            device="cpu",
        ),
        progress=False,
    )
    assert summary["steps"] == 4 and summary["teachers"] == ["other-tok", "teacher-a", "teacher-a-think"]
    assert np.isfinite(summary["mean_last_20_kv_k"]) and summary["mean_last_20_kv_k"] > 0


def test_teachers_of_one_job_skip_the_same_samples_and_apart_finalize_names_the_skips(tiny_store, tmp_path):
    """A dual-prompt teacher's longer template is over --max-len on samples its plain twin fits.
    Dumped as one job (dump_tasks / jobs configs set length_teachers) both skip them and the store
    finalizes; dumped apart, each by its own length, finalize refuses naming the skips and the fix."""
    plain = tiny_store["teachers"][0]
    think = ModelSpec(name_or_path=plain.name_or_path, name="think", prompt_template=THINK)
    rows = load_examples(tiny_store["data"])
    s_tok, t_tok = (AutoTokenizer.from_pretrained(m.name_or_path) for m in (tiny_store["student"], plain))
    fits = [max(len(encode(s_tok, DEFAULT_TEMPLATE, e)), len(encode(t_tok, plain.prompt_template, e))) for e in rows]
    longer = [len(encode(t_tok, THINK, ex)) for ex in rows]
    limit = sorted(longer)[len(longer) // 2]
    over = {ex.id for ex, a, b in zip(rows, fits, longer, strict=True) if max(a, b) > limit}
    assert {ex.id for ex, a in zip(rows, fits, strict=True) if a > limit} < over  # the think template alone skips some

    together = tmp_path / "together"
    base = _cfg(tiny_store, together, max_len=limit, on_too_long="skip", num_shards=2)
    run_local(dump_tasks(base, [plain, think]), progress=False)
    finalize(base.store)
    for name in ("teacher-a", "think"):
        readers = [ShardReader(base.store, name, i) for i in range(2)]
        assert {sid for r in readers for sid in r.attrs["skipped"]} == over
        assert {sid for r in readers for sid in r.sample_ids} == {ex.id for ex in rows} - over

    apart = tmp_path / "apart"
    for t in (plain, think):
        run_dump(_cfg(tiny_store, apart, teacher=t, max_len=limit, on_too_long="skip"), progress=False)
    with pytest.raises(StoreError, match=rf"'think' skipped \d+ over max_len {limit} that the other holds.*one jobs"):
        finalize(apart / "s.zarr")


def test_a_dual_prompt_teacher_is_resampled_per_segment_with_endpoints_exact(tiny_store, tmp_path):
    plain = tiny_store["teachers"][0]
    think = ModelSpec(name_or_path=plain.name_or_path, name="think", prompt_template=THINK)
    run_dump(_cfg(tiny_store, tmp_path, teacher=think, num_shards=1), progress=False)
    spec = read_teacher_specs(tmp_path / "s.zarr")["think"]
    reader = ShardReader(tmp_path / "s.zarr", "think", 0)
    ex = {e.id: e for e in load_examples(tiny_store["data"])}[reader.sample_ids[0]]
    k_t, t_enc = _teacher_kv(plain.name_or_path, THINK, ex, spec.layer_map)
    got = reader.rows(0, int(reader.offsets[1]), ("k",))["k"]  # [T_s, L_s, D]
    s_seg = reader.rows(0, int(reader.offsets[1]), ("input_ids",))["input_ids"]
    s_enc = encode(AutoTokenizer.from_pretrained(tiny_store["student"].name_or_path), DEFAULT_TEMPLATE, ex)
    assert np.array_equal(s_seg, s_enc.input_ids) and len(s_enc) != len(t_enc)
    # Each segment's first and last student token take exactly the teacher's first / last token
    # of the same segment (linear resampling preserves endpoints; segments never mix).
    for seg in range(3):
        (s_idx,), (t_idx,) = np.nonzero(s_enc.segment_ids == seg), np.nonzero(t_enc.segment_ids == seg)
        for a, b in ((s_idx[0], t_idx[0]), (s_idx[-1], t_idx[-1])):
            np.testing.assert_allclose(got[a], k_t[b].numpy(), rtol=0, atol=1e-6)


def test_forcing_identity_onto_another_tokenizer_is_a_clear_error(tiny_store, tmp_path, other_tokenizer_teacher):
    teacher = ModelSpec(name_or_path=str(other_tokenizer_teacher))
    with pytest.raises(ValueError, match="time_map 'identity' needs the student's tokenizer"):
        run_dump(_cfg(tiny_store, tmp_path, teacher=teacher, align=AlignSpec(time_map="identity")), progress=False)


@pytest.mark.parametrize("level, shuffle", [(1, "byte"), (5, "bit")])
def test_the_compression_level_and_shuffle_reach_the_stored_kv_and_read_back_the_same(
    tiny_store, tmp_path, level, shuffle
):
    res = run_dump(
        _cfg(tiny_store, tmp_path, kv_dtype="float16", num_shards=2, compression_level=level, blosc_shuffle=shuffle),
        progress=False,
    )
    r = ShardReader(tmp_path / "s.zarr", res.teacher, 0)
    (blosc,) = [c for c in r.group["k"].metadata.codecs[0].codecs if type(c).__name__ == "BloscCodec"]
    assert (
        blosc.clevel == level
        and blosc.cname.value == "zstd"
        and blosc.shuffle.value == {"byte": "shuffle", "bit": "bitshuffle"}[shuffle]
    )
    assert "k" in r.fast and inspect(tmp_path / "s.zarr")["blosc_shuffle"] == shuffle
    ref = ShardReader(tiny_store["store"], res.teacher, 0)  # the fixture's store: float16, default level
    n = int(ref.offsets[-1])
    assert r.sample_ids == ref.sample_ids and np.array_equal(r.rows(0, n, ("k",))["k"], ref.rows(0, n, ("k",))["k"])


def test_a_compression_level_outside_blosc_range_is_refused(tiny_store, tmp_path):
    with pytest.raises(ConfigError, match=r"compression_level: blosc levels are 0 \(none\) to 9, got 10"):
        _cfg(tiny_store, tmp_path, compression_level=10)


def test_a_compression_level_with_the_uncompressed_webdataset_backend_is_refused(tiny_store, tmp_path):
    with pytest.raises(
        ConfigError, match="webdataset tars store K/V uncompressed, so level 3 / byte shuffle would be ignored"
    ):
        _cfg(tiny_store, tmp_path, backend="webdataset", compression_level=3)
    with pytest.raises(ConfigError, match="level 1 / bit shuffle would be ignored"):
        _cfg(tiny_store, tmp_path, backend="webdataset", blosc_shuffle="bit")


def test_host_memory_kept_reuses_freed_memory_and_hands_it_back_after(tmp_path):
    """Inside the block a large buffer freed and allocated again reuses the process's pages (few
    new page faults); outside, glibc maps it afresh each time and every page faults again. After
    the block the kept memory goes back to the kernel."""
    import resource

    from kvdistill.dump.run import _glibc, host_memory_kept

    if _glibc() is None:
        pytest.skip("glibc only")
    page = resource.getpagesize()

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def faults(times: int = 16, mib: int = 64) -> int:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            t = torch.empty(mib << 18)  # float32: mib MiB
            t.fill_(1.0)  # touch every page
            del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    pages = (64 << 20) // page
    before = faults()
    r0 = resident()
    with host_memory_kept(torch.device("cpu")):
        kept = faults()
    assert before >= 15 * pages  # glibc's default: each allocation mapped afresh
    # Kept: a fraction (alone: the first allocation only; after hundreds of other tests in the
    # process, up to half of them were seen faulting, the heap's layout being what it is).
    assert kept < 0.6 * before
    assert resident() - r0 < (32 << 20)  # the 64 MiB kept in the block is handed back
