"""Teacher top-K log-probs in the store (`dump --logits-top-k K`), beside K/V: what is stored equals
the teacher's own log_softmax, where it is refused, how verify / inspect / plan / the sample
reader see it, and the offline top-k KL loss on the trainer's side."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvdistill.align.time import linear_resample_time_map, stack_time_maps
from kvdistill.cli import DEBUG_HINT, main
from kvdistill.core.capture import head_mismatch, output_head, top_log_probs
from kvdistill.core.data import load_examples
from kvdistill.core.models import model_fingerprint
from kvdistill.core.prompts import encode
from kvdistill.dump.run import _top_logits, run_dump
from kvdistill.errors import ExitCode
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import DEFAULT_TEMPLATE, ConfigError, DumpConfig, ModelSpec, TeacherSpec
from kvdistill.store import ShardReader, ShardWriter, StoreError, finalize, format_inspect, inspect, read_teacher_specs
from kvdistill.store.plan import plan
from kvdistill.store.samples import zarr_samples
from kvdistill.store.verify import verify
from kvdistill.train.losses import topk_kl

K = 8
# Another prompt template whose segments have as many tokens as the default's on every sample
# (asserted below): segment_linear is then one-to-one, though the texts differ.
SAME_LENGTHS = "Q: {question}\nReasoning:\n{reasoning}\n## {answer}"
THINK = "Solve it step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\nFinal answer: {answer}"


@pytest.fixture(scope="module")
def logits_store(tmp_path_factory, make_model, student_path, tiny_data):
    """2 shards, one job: teacher-a (Qwen2, the student's tokenizer, identity map) with top-8 logits,
    teacher-b (Llama) without (teacher_logits_top_k teacher-b=0), teacher-q = teacher-a reading
    SAME_LENGTHS (segment_linear, one-to-one) with logits."""
    a = str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32))
    teachers = [
        ModelSpec(name_or_path=a, name="teacher-a"),
        ModelSpec(
            name_or_path=str(make_model("llama", layers=2, hidden=64, heads=4, kv_heads=1, head_dim=16)),
            name="teacher-b",
        ),
        ModelSpec(name_or_path=a, name="teacher-q", prompt_template=SAME_LENGTHS),
    ]
    store = tmp_path_factory.mktemp("logits") / "lg.zarr"
    base = DumpConfig(
        teacher=teachers[0],
        student=ModelSpec(name_or_path=str(student_path), name="student"),
        store=str(store),
        data=tiny_data,
        num_shards=2,
        batch_size=8,
        device="cpu",
        logits_top_k=K,
        teacher_logits_top_k={"teacher-b": 0},
    )
    results = run_local(dump_tasks(base, teachers), progress=False)
    finalize(store)
    return {"store": store, "teachers": teachers, "base": base, "results": results}


def _own_log_probs(path: str, template: str, ex) -> tuple[torch.Tensor, object]:
    """The teacher's log_softmax [T_t, V] on its own rendering of `ex`, alone (no batch, no padding):
    independent of the dump."""
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    e = encode(tok, template, ex)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(e.input_ids, dtype=torch.long)[None]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1), e


def _stored(store, teacher: str):
    """{sample id: (ids [T, K], lp [T, K])} of every shard of `teacher`."""
    out = {}
    for shard in range(2):
        r = ShardReader(store, teacher, shard)
        rows = r.rows(0, int(r.offsets[-1]), ("logits_ids", "logits_lp"))
        for j, sid in enumerate(r.sample_ids):
            a, b = int(r.offsets[j]), int(r.offsets[j + 1])
            out[sid] = (rows["logits_ids"][a:b], rows["logits_lp"][a:b])
    return out


def _assert_top_k(ids, lp, own: torch.Tensor) -> None:
    """Stored (ids, lp) [T, K] are own [T, V]'s top K: ids exact, log-probs to float16 rounding."""
    want_lp, want_ids = own.topk(K, dim=-1)
    assert ids.dtype == np.int32 and lp.dtype == np.float16 and ids.shape == lp.shape == (len(own), K)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(lp.astype(np.float32), want_lp.numpy(), rtol=2**-10, atol=0)  # one float16 ulp


# --- what is stored ---------------------------------------------------------------------------------


def test_dump_stores_the_teachers_own_top_k_log_softmax_on_the_students_rows(logits_store, tiny_data):
    store, path = logits_store["store"], logits_store["teachers"][0].name_or_path
    stored = _stored(store, "teacher-a")
    examples = load_examples(tiny_data)
    assert sorted(stored) == sorted(ex.id for ex in examples)
    for ex in examples[::6]:
        own, enc = _own_log_probs(path, DEFAULT_TEMPLATE, ex)
        ids, lp = stored[ex.id]
        _assert_top_k(ids, lp, own)  # row t predicts the student's token t + 1 (identity map)
    spec = read_teacher_specs(store)["teacher-a"]
    assert spec.logits_top_k == K and spec.time_map == "identity"
    r = ShardReader(store, "teacher-a", 0)
    assert r.logits_top_k == K and r.attrs["logits"] == {"top_k": K, "vocab_size": own.shape[-1]}
    assert r.array("logits_ids").chunks[0] == r.array("k").chunks[0]  # chunked by rows as K / V
    assert {"logits_ids", "logits_lp"} <= set(r.attrs["crc32"])  # checksummed like K / V


def test_a_dual_prompt_teacher_with_equal_segment_lengths_gets_the_rows_its_segments_align(logits_store, tiny_data):
    store, path = logits_store["store"], logits_store["teachers"][2].name_or_path
    assert read_teacher_specs(store)["teacher-q"].time_map == "segment_linear"
    tok = AutoTokenizer.from_pretrained(path)
    stored = _stored(store, "teacher-q")
    for ex in load_examples(tiny_data)[::6]:
        s, t = encode(tok, DEFAULT_TEMPLATE, ex), encode(tok, SAME_LENGTHS, ex)
        assert np.array_equal(np.bincount(s.segment_ids), np.bincount(t.segment_ids))  # the premise
        assert not np.array_equal(s.input_ids, t.input_ids)  # other text: not the identity
        own, _ = _own_log_probs(path, SAME_LENGTHS, ex)  # student row i <- teacher position i of its segment
        _assert_top_k(*stored[ex.id], own)
    # the teacher reading the student's text has other distributions on the prompt rows
    ids_a, _ = _stored(store, "teacher-a")[ex.id]
    assert not np.array_equal(
        ids_a[: int(np.argmax(s.segment_ids == 1))], stored[ex.id][0][: int(np.argmax(s.segment_ids == 1))]
    )


def test_reading_samples_gives_each_logits_teacher_its_rows_and_others_none(logits_store):
    store = logits_store["store"]
    want = _stored(store, "teacher-a")
    samples = list(zarr_samples(store, ["teacher-a", "teacher-b", "teacher-q"], [0, 1], read_logits=True))
    assert len(samples) == len(want)
    for s in samples:
        assert sorted(s["logits"]) == ["teacher-a", "teacher-q"]  # teacher-b stores none (its spec says 0)
        ids, lp = s["logits"]["teacher-a"]
        T = len(s["input_ids"])
        assert ids.shape == lp.shape == (T, K) and ids.dtype == np.int32 and lp.dtype == np.float16
        np.testing.assert_array_equal(ids, want[s["sample_id"]][0])
        np.testing.assert_array_equal(lp, want[s["sample_id"]][1])
    # a rank's share (keep) reads the same rows; without read_logits the samples are as before
    keep = np.array([1, 5, 30])
    kept = list(zarr_samples(store, ["teacher-a"], [0, 1], read_logits=True, keep=keep))
    for p, s in zip(keep, kept, strict=True):
        np.testing.assert_array_equal(s["logits"]["teacher-a"][1], samples[p]["logits"]["teacher-a"][1])
    plain = next(iter(zarr_samples(store, ["teacher-a"], [0])))
    assert "logits" not in plain and sorted(plain) == ["input_ids", "kv", "loss_mask", "sample_id", "shard"]
    with pytest.raises(StoreError, match=r"none of teachers \['teacher-b'\] stores logits.*--logits-top-k K"):
        next(iter(zarr_samples(store, ["teacher-b"], [0], read_logits=True)))
    with pytest.raises(
        StoreError, match="holds no teacher logits; re-dump this teacher with `kvdistill dump --logits-top-k K`"
    ):
        ShardReader(store, "teacher-b", 0).rows(0, 3, ("logits_lp",))


def test_a_store_dumped_without_logits_is_unchanged(tiny_store):
    store = tiny_store["store"]
    for name, spec in read_teacher_specs(store).items():
        assert spec.logits_top_k == 0
        r = ShardReader(store, name, 0)
        assert not any(n.startswith("logits") for n in r.names) and "logits" not in r.attrs and r.logits_top_k == 0
    # its fingerprint is the one kvdistill computed before logits existed (a complete shard stays a no-op)
    spec = read_teacher_specs(store)["teacher-a"]
    model = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path)
    old = [spec.align.to_dict(), spec.layer_map, spec.projection, spec.kv_dtype, None]
    assert model_fingerprint(model, spec.model, old) == spec.fingerprint
    # and an older record, without the field, reads as 0
    d = spec.to_dict()
    del d["logits_top_k"]
    assert TeacherSpec.from_dict(d).logits_top_k == 0


# --- refused before the store is touched -----------------------------------------------------------


def _argv(student, store, teacher, *extra) -> list[str]:
    return [
        "dump",
        "--teacher",
        teacher,
        "--student",
        student,
        "--store",
        str(store),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_a_cross_tokenizer_teacher_is_refused_in_one_line_with_exit_3(
    student_path, other_tokenizer_teacher, tmp_path, capsys
):
    store = tmp_path / "x.zarr"
    argv = _argv(
        str(student_path), store, str(other_tokenizer_teacher), "--teacher-name", "other-tok", "--logits-top-k", "8"
    )
    assert main(argv) == ExitCode.BAD_INPUT == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.endswith(DEBUG_HINT)
    assert err.startswith(
        "kvdistill dump: ValueError: drop --logits-top-k for teacher other-tok (in a job of several teachers: "
        "--teacher-logits-top-k other-tok=0): its tokens are not the student's"
    )
    assert not store.exists()


def test_an_interpolating_segment_map_is_refused_naming_the_sample(logits_store, tmp_path):
    a = logits_store["teachers"][0]
    cfg = DumpConfig.from_dict(
        {
            **logits_store["base"].to_dict(),
            "store": str(tmp_path / "x.zarr"),
            "teacher": {**a.to_dict(), "name": "think", "prompt_template": THINK},
        }
    )
    with pytest.raises(
        ValueError,
        match=(
            r"drop --logits-top-k for teacher think .*: sample synth-train-\d+ has \[\d+, \d+, \d+\] student / \[\d+,"
            r" \d+, \d+\] "
            r"teacher tokens per segment \(prompt, reasoning, answer\), so its segment_linear time map interpolates"
        ),
    ):
        run_dump(cfg, progress=False)
    assert not (tmp_path / "x.zarr").exists()
    # forced char_overlap (it mixes tokens) and the webdataset backend are refused too
    for kw, why in (
        ({"align": {"time_map": "char_overlap"}}, "its time map char_overlap mixes"),
        ({"backend": "webdataset"}, "zarr backend only"),
    ):
        cfg = DumpConfig.from_dict({**logits_store["base"].to_dict(), "store": str(tmp_path / "y.zarr"), **kw})
        with pytest.raises(ValueError, match=why):
            run_dump(cfg, progress=False)
        assert not (tmp_path / "y.zarr").exists()


def test_a_time_map_that_is_not_one_hot_at_dump_time_is_an_error_not_a_fallback(logits_store):
    """The preflight rules it out; the batch step still refuses one, naming sample and token."""
    from kvdistill.core.prompts import Encoded

    def enc(sid, T):
        return Encoded(
            sid, np.zeros(T, np.int32), np.zeros(T, np.uint8), np.zeros(T, bool), np.zeros((T, 2), np.int64)
        )

    batch = [(enc("s0", 4), enc("s0", 4)), (enc("s1", 3), enc("s1", 4))]
    tmap = stack_time_maps([None, linear_resample_time_map(4, 3)], [4, 4], 5)  # s1's row 1 reads teacher 1.5
    with pytest.raises(ValueError, match=r"teacher t: sample s1 token 1 is aligned to several teacher tokens"):
        _top_logits("t", batch, torch.zeros(2, 5, 4), tmap, (lambda h: h, 4), K)


def test_a_rerun_with_another_top_k_is_refused_so_a_store_never_mixes_them(logits_store, tmp_path):
    store = tmp_path / "mix.zarr"
    cfg = DumpConfig.from_dict({**logits_store["base"].to_dict(), "store": str(store), "teacher_logits_top_k": {}})
    run_dump(cfg, progress=False)  # shard 0 with top-8 logits
    other = DumpConfig.from_dict({**cfg.to_dict(), "shard": 1, "logits_top_k": 0})
    with pytest.raises(StoreError, match="teacher 'teacher-a' already holds shards of another teacher setup"):
        run_dump(other, progress=False)
    again = DumpConfig.from_dict({**cfg.to_dict(), "logits_top_k": 16})  # shard 0 again, complete: not a no-op
    with pytest.raises(StoreError, match=r"teacher fingerprint \(weights, template, alignment, codec\): shard has"):
        run_dump(again, progress=False)
    assert run_dump(cfg, progress=False).status == "already complete"


def test_top_k_is_validated():
    for bad in (-1, 1025):
        with pytest.raises(ConfigError, match=r"logits_top_k: top-K log-probs per token, 1 to 1024 \(0: none\)"):
            DumpConfig.from_dict(
                {"teacher": {"name_or_path": "t"}, "student": {"name_or_path": "s"}, "store": "x", "logits_top_k": bad}
            )
    with pytest.raises(ConfigError, match=r"teacher_logits_top_k\[a\]"):
        DumpConfig.from_dict(
            {
                "teacher": {"name_or_path": "t"},
                "student": {"name_or_path": "s"},
                "store": "x",
                "teacher_logits_top_k": {"a": 2000},
            }
        )


# --- the head ---------------------------------------------------------------------------------------


def test_the_head_reproduces_the_models_logits_and_a_head_it_does_not_know_is_caught(logits_store):
    model = AutoModelForCausalLM.from_pretrained(logits_store["teachers"][0].name_or_path).eval()
    ids = torch.arange(3, 40)[None]
    head, vocab = output_head(model)
    assert vocab == model.config.vocab_size and head_mismatch(model, head, ids, torch.ones_like(ids)) < 1e-6
    model.logit_scale = 0.5  # now output_head scales (as for Cohere), the Qwen2 forward does not
    assert head_mismatch(model, output_head(model)[0], ids, torch.ones_like(ids)) > 0.1
    # chunks of positions give what one pass gives
    with torch.no_grad():
        h = torch.randn(50, model.config.hidden_size)
        one = top_log_probs(head, vocab, h, K)
        chunked = top_log_probs(head, vocab, h, K, chunk_bytes=4 * vocab * 7)  # 7 rows a chunk
    assert torch.equal(one[0], chunked[0])  # the same tokens; log-probs to the matmul's rounding
    torch.testing.assert_close(one[1], chunked[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(one[1], torch.log_softmax(head(h), -1).topk(K)[0], rtol=0, atol=1e-5)


def test_the_writer_takes_logits_exactly_when_it_has_top_k(tmp_path):
    k, v, ids = np.zeros((3, 2, 4), np.float16), np.zeros((3, 2, 4), np.float16), np.arange(3)
    with ShardWriter(tmp_path / "w.zarr", "t", 0, num_layers=2, width=4, logits_top_k=2, vocab_size=10) as w:
        with pytest.raises(ValueError, match="the writer stores the top 2 log-probs per token; pass logits="):
            w.write("a", k, v, ids, ids > 0)
        with pytest.raises(ValueError, match=r"logits ids outside the vocabulary \[0, 10\)"):
            w.write("a", k, v, ids, ids > 0, logits=(np.full((3, 2), 10), np.zeros((3, 2))))
        w.write("a", k, v, ids, ids > 0, logits=(np.ones((3, 2)), np.zeros((3, 2))))
    with ShardWriter(tmp_path / "w.zarr", "t", 1, num_layers=2, width=4) as w:
        with pytest.raises(ValueError, match="logits given but the writer has no logits_top_k"):
            w.write("a", k, v, ids, ids > 0, logits=(np.ones((3, 2)), np.zeros((3, 2))))
        w.write("a", k, v, ids, ids > 0)


# --- verify, inspect, plan ----------------------------------------------------------------------------


def test_verify_finds_a_flipped_byte_in_logits_lp_and_the_reader_refuses_it(logits_store, tmp_path):
    assert verify(logits_store["store"]) == []
    store = tmp_path / "copy.zarr"
    shutil.copytree(logits_store["store"], store)
    f = next(p for p in sorted((store / "teachers/teacher-a/shard-00000/logits_lp/c").rglob("*")) if p.is_file())
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    problems = verify(store)
    assert problems and all(p.teacher == "teacher-a" and p.shard == 0 for p in problems)
    assert any("logits_lp" in p.what and "crc32c" in p.what for p in problems)
    from kvdistill.store.errors import CorruptShard

    for read_logits in (True, False):  # read, or only checked (not decoded) by a K/V-only reader
        with pytest.raises(CorruptShard, match=r"teacher 'teacher-a' shard-00000: array logits_lp: .*crc32c"):
            sum(1 for _ in zarr_samples(store, ["teacher-a"], [0], read_logits=read_logits))


def test_verify_names_logits_that_break_their_promise(logits_store, tmp_path):
    """Values a checksum cannot vouch for (written so by a bug): ids outside the vocabulary,
    log-probs that do not descend or exceed 0; a shard without the arrays its spec asks for."""
    import zarr

    store = tmp_path / "copy.zarr"
    shutil.copytree(logits_store["store"], store)
    g = zarr.open_group(store / "teachers/teacher-a/shard-00001", mode="r+")
    lp = g["logits_lp"][:]
    lp[5] = lp[5][::-1]
    g["logits_lp"][:] = lp
    crc = dict(g.attrs["kvdistill"])
    import zlib

    crc["crc32"] = {**crc["crc32"], "logits_lp": zlib.crc32(np.ascontiguousarray(lp).tobytes())}
    g.attrs["kvdistill"] = crc
    what = [p.what for p in verify(store) if p.teacher == "teacher-a"]
    assert any("logits_lp of row 5 do not descend" in w for w in what), what
    shutil.rmtree(store / "teachers/teacher-a/shard-00000/logits_ids")
    what = [p.what for p in verify(store) if p.teacher == "teacher-a" and p.shard == 0]
    assert any("lacks logits_ids" in w for w in what), what


def test_inspect_and_plan_count_the_logits_bytes(logits_store):
    info = inspect(logits_store["store"])
    a, b = info["teachers"]["teacher-a"], info["teachers"]["teacher-b"]
    assert a["logits_top_k"] == K and b["logits_top_k"] == 0 and b["logits_bytes"] == 0
    assert 0 < a["logits_bytes"] < a["bytes"] and a["logits_bytes_per_token"] == pytest.approx(
        a["logits_bytes"] / a["tokens"]
    )
    text = format_inspect(info)
    line = next(x for x in text.splitlines() if x.startswith("teacher-a "))
    assert f" {K} " in line
    assert f"logits of teacher teacher-a: top-{K} log-probs per token" in text
    spec = read_teacher_specs(logits_store["store"])["teacher-a"]
    from kvdistill.schemas import KVGeometry

    s = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16)
    with_logits = plan(spec.geometry, s, num_samples=48, mean_tokens=90.0, logits_top_k=K)
    without = plan(spec.geometry, s, num_samples=48, mean_tokens=90.0)
    assert with_logits["raw_bytes_per_token"] - without["raw_bytes_per_token"] == K * (4 + 2)
    assert with_logits["logits_bytes_per_token"] == K * 6 and without["logits_bytes_per_token"] == 0


# --- the loss ---------------------------------------------------------------------------------------


def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g) * 2
    lp, ids = torch.log_softmax(teacher, -1).sort(-1, descending=True)
    for T in (1.0, 2.0):
        full = (
            T
            * T
            * torch.nn.functional.kl_div(
                torch.log_softmax(student / T, -1),
                torch.log_softmax(teacher / T, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
        )
        torch.testing.assert_close(topk_kl(student, ids, lp, T), full)


def test_topk_kl_is_zero_when_the_student_matches_the_teacher_on_its_support_and_scales_with_t_squared():
    g = torch.Generator().manual_seed(1)
    V, k = 50, 5
    lp, ids = torch.log_softmax(torch.randn(4, V, generator=g) * 3, -1).topk(k)
    student = torch.full((4, V), -1e4).scatter(-1, ids, lp)  # the teacher's top-k distribution, no tail
    assert torch.allclose(topk_kl(student, ids, lp, 1.0), torch.zeros(4), atol=1e-6)
    assert torch.allclose(topk_kl(student, ids, lp, 3.0), torch.zeros(4), atol=1e-5)
    other = torch.randn(4, V, generator=g)
    p, log_q = torch.softmax(lp / 2, -1), torch.log_softmax(other / 2, -1).gather(-1, ids)
    want = (p * (p.log() - log_q)).sum(-1)
    torch.testing.assert_close(topk_kl(other, ids, lp, 2.0), 4 * want)  # T^2 x the tempered KL
    assert (topk_kl(other, ids.to(torch.int32), lp.half(), 1.0) > 0).all()  # the store's dtypes


def test_topk_kl_sends_gradient_to_the_student_only():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(3, 20, generator=g, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(3, 20, generator=g), -1).topk(4)
    lp.requires_grad_(True)
    topk_kl(student, ids, lp, 2.0).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert lp.grad is None
