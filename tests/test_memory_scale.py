"""Memory at real widths (issue 25): the training stream's shuffle buffer is capped in bytes
(TrainConfig.shuffle_buffer_bytes), computed from the store alone so the global order stays
the same on any number of ranks, and unchanged where the cap does not bind; the eval
perplexity pass scores hidden states through the LM head in chunks, never holding [B, T, V]
logits. Memory is measured, as in tests/test_stream_memory.py: tracemalloc for the stream (its
samples are numpy arrays), the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs) for torch's CPU tensors in the perplexity pass."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvdistill.store.samples as store_samples
import kvdistill.train.eval as eval_mod
from kvdistill.core.data import load_examples
from kvdistill.core.models import load_model, load_tokenizer
from kvdistill.core.prompts import encode
from kvdistill.schemas import (
    AlignSpec,
    DataSpec,
    EvalConfig,
    KVGeometry,
    ModelSpec,
    StoreSpec,
    TeacherSpec,
    TrainConfig,
)
from kvdistill.store import ShardWriter, finalize, init_store, init_teacher, zarr_to_wds
from kvdistill.train.eval import evaluate, hidden_nll, plain_head, sequence_nll
from kvdistill.train.latent import LatentHead, jacobi
from kvdistill.train.losses import masked_ce
from kvdistill.train.stream import KVStream, MicroBatches, _shuffled

TEACHERS = ["teacher-a", "teacher-b"]
L, H, d = 4, 2, 64  # D = 128: a float16 K+V row is 2 KiB, a 512-token sample 1 MiB
MiB = 2**20


def _store(path: Path, samples: int) -> list[int]:
    """A one-teacher float16 store of `samples` samples of 256-767 tokens (mean ~512: ~1 MiB of
    K+V each) over 2 shards; returns the token counts."""
    geom = KVGeometry(num_layers=L, num_kv_heads=H, head_dim=d)
    init_store(
        path,
        StoreSpec(
            student=ModelSpec("m"),
            geometry=geom,
            tokenizer_fingerprint="m",
            data=DataSpec(),
            data_fingerprint="m",
            num_shards=2,
        ),
    )
    eye = [[float(i == j) for j in range(L)] for i in range(L)]
    init_teacher(
        path,
        TeacherSpec(
            name="t",
            model=ModelSpec("m"),
            geometry=geom,
            align=AlignSpec(),
            time_map="identity",
            layer_map=eye,
            width=geom.width,
            fingerprint="m",
        ),
    )
    rng = np.random.default_rng(0)
    lengths = []
    for s in range(2):
        with ShardWriter(path, "t", s, num_layers=L, width=geom.width, compression_level=0) as w:
            for j in range(samples // 2):
                n = 256 + (j * 197 + s * 61) % 512
                kv = rng.standard_normal((2, n, L, geom.width), dtype=np.float32).astype(np.float16)
                w.write(f"s{s}-{j}", kv[0], kv[1], np.zeros(n, np.int32), np.ones(n, np.bool_))
                lengths.append(n)
    finalize(path)
    return lengths


def _held(stream: KVStream) -> int:
    """Peak bytes allocated (numpy and Python, every thread) while iterating an epoch of the
    stream one sample at a time, above what was allocated before the first."""
    len(stream), stream.order(0)  # index and order computed before measuring
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for sample in stream:
            del sample
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_the_byte_cap_bounds_the_samples_the_stream_holds(tmp_path, monkeypatch):
    lengths = _store(tmp_path / "wide.zarr", samples=64)
    monkeypatch.setattr(store_samples, "READ_SPAN_CHUNKS", 1)  # read spans of one ~1 MiB chunk: the buffer dominates
    row = 2 * L * H * d * 2  # K + V float16 bytes of one token row
    store_bytes, biggest = sum(lengths) * row, max(lengths) * row
    cap = 8 * MiB

    def stream(**kw) -> KVStream:
        return KVStream(tmp_path / "wide.zarr", ["t"], seed=1, kv_as_stored=True, **kw)

    capped = stream(shuffle_buffer=256, shuffle_buffer_bytes=cap)
    assert capped.sample_bytes == pytest.approx(store_bytes / len(lengths))  # ~1 MiB: index rows x codec bytes
    assert capped.buffer_size == cap // capped.sample_bytes == 8  # a mean sample of 500 tokens
    alone = _held(stream(shuffle_buffer=1))  # read spans + the sample consumed: no buffer at all
    held = _held(capped)
    unbound = _held(stream(shuffle_buffer=256))  # the old behaviour: 256 samples, i.e. the whole store
    print(
        f"held above a 1-sample buffer: capped at {cap / MiB:.0f} MiB {(held - alone) / MiB:.1f} MiB, "
        f"uncapped {(unbound - alone) / MiB:.1f} MiB (store {store_bytes / MiB:.1f} MiB)"
    )
    assert held - alone <= cap + biggest
    assert unbound - alone > 0.75 * store_bytes  # the measurement sees a buffer that holds everything
    # Every sample, once, in an order that is the capped buffer's over the seeded shard order.
    got = [s["sample_id"] for s in capped]
    assert sorted(got) == sorted(s["sample_id"] for s in stream(shuffle_buffer=1))
    assert capped.order(0).tolist() == list(_shuffled(range(len(got)), 8, random.Random("1-0")))


def _kv_bytes(samples) -> float:
    return float(np.mean([sum(x.nbytes for kv in s["kv"].values() for x in kv) for s in samples]))


def test_the_cap_is_the_store_s_alone_and_keeps_one_order_over_ranks(tiny_store, tmp_path):
    stream = KVStream(tiny_store["store"], TEACHERS, seed=2)
    samples = list(stream)
    held = _kv_bytes(samples)  # float16 as stored
    assert stream.sample_bytes == pytest.approx(held)  # index.parquet x codec bytes per row = what a sample holds
    wds = zarr_to_wds(
        tiny_store["store"], tmp_path / "f32.wds", kv_dtype="float32"
    )  # a webdataset store of float32 K/V
    assert (
        KVStream(wds, TEACHERS).sample_bytes
        == pytest.approx(_kv_bytes(KVStream(wds, TEACHERS)))
        == pytest.approx(2 * held)
    )
    for read_kv, as_stored in ((False, True), (True, False)):  # what is read and how it is held change nothing
        other = KVStream(
            tiny_store["store"],
            TEACHERS,
            seed=2,
            read_kv=read_kv,
            kv_as_stored=as_stored,
            shuffle_buffer_bytes=int(3.5 * held),
        )
        assert other.buffer_size == 3
    # A binding cap: 2 ranks x batch 4 train the samples of 1 rank x batch 8, in the same order.
    cap = int(3.5 * held)

    def ranks(world: int, b: int) -> list[str]:
        """The samples trained, in slot order (micro-batch m of rank r: slot m x world + r)."""
        slots = {}
        for r in range(world):
            stream = KVStream(tiny_store["store"], TEACHERS, seed=2, shuffle_buffer_bytes=cap)
            for mb in MicroBatches(
                stream, b, lambda s: {"ids": [x["sample_id"] for x in s]}, rank=r, world_size=world
            ):
                if mb["weight"]:
                    slots[(mb["window"], mb["micro"] * world + r)] = mb["ids"]
        return [i for key in sorted(slots) for i in slots[key]]

    one = ranks(1, 8)
    assert (
        ranks(2, 4)
        == one
        == [s["sample_id"] for s in KVStream(tiny_store["store"], TEACHERS, seed=2, shuffle_buffer_bytes=cap)]
    )
    assert one != [s["sample_id"] for s in samples]  # the cap binds: another order than a buffer of 256


def test_the_order_is_unchanged_where_the_cap_does_not_bind(tiny_store):
    default = TrainConfig.__dataclass_fields__["shuffle_buffer_bytes"].default
    for seed, buffer in ((0, 256), (3, 5), (7, 1)):
        old = KVStream(
            tiny_store["store"], TEACHERS, seed=seed, shuffle_buffer=buffer
        )  # no cap: the order before the cap existed
        new = KVStream(tiny_store["store"], TEACHERS, seed=seed, shuffle_buffer=buffer, shuffle_buffer_bytes=default)
        assert new.buffer_size == buffer
        for epoch in (0, 1):
            want = list(_shuffled(range(len(old)), buffer, random.Random(f"{seed}-{epoch}")))
            assert old.order(epoch).tolist() == new.order(epoch).tolist() == want
    assert [s["sample_id"] for s in new] == [s["sample_id"] for s in old]


def _clear_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError as e:
        pytest.skip(f"cannot reset the resident high-water mark here: {e}")


def _status(key: str) -> int:
    return (
        int(next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key)).split()[1]) * 1024
    )


def _peak(fn):
    """(fn(), peak resident bytes while it ran above the resident bytes before)."""
    _clear_hwm()
    base = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - base


@pytest.fixture(scope="module")
def wide_vocab():
    """A tiny Llama with a 150k vocabulary (hidden 32) and a batch of 64 x 64 tokens: full
    float32 logits would be 64 x 64 x 150,000 x 4 B = 2.4 GB."""
    cfg = LlamaConfig(
        vocab_size=150_000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (64, 64), generator=g)
    attn = torch.ones_like(ids)
    attn[::2, 40:] = 0  # right padding on every other row
    lmask = torch.zeros_like(ids, dtype=torch.bool)
    lmask[:, 12:] = True  # the "prompt" is the first 12 tokens
    return model, ids, attn, lmask & attn.bool()


@torch.inference_mode()
def test_chunked_perplexity_stays_small_at_a_150k_vocabulary(wide_vocab):
    model, ids, attn, lmask = wide_vocab
    assert plain_head(model)
    sequence_nll(model, ids[:2], attn[:2], lmask[:2])  # warm-up: kernels and pages touched once
    (nll, n), peak = _peak(lambda: sequence_nll(model, ids, attn, lmask))
    full = 64 * 64 * 150_000 * 4
    # The measurement bites: the full logits of 4 rows (1/16 of the batch) cost more than all 64 chunked.
    _, peak4 = _peak(
        lambda: masked_ce(model(input_ids=ids[:4], attention_mask=attn[:4]).logits, ids[:4], lmask[:4]).item()
    )
    print(
        f"perplexity pass, batch 64 x 64, vocab 150k: chunked peak {peak / MiB:.0f} MiB (full logits {full / MiB:.0f}"
        f" MiB); full logits of 4 rows {peak4 / MiB:.0f} MiB"
    )
    assert n == int(lmask[:, 1:].sum()) and np.isfinite(nll)
    assert peak < 400 * MiB and peak < full / 10
    assert peak4 > peak


@torch.inference_mode()
def test_chunked_perplexity_equals_the_full_logits(wide_vocab, make_model, tiny_data, monkeypatch):
    model, ids, attn, lmask = wide_vocab
    ids, attn, lmask = (
        ids[:4, :32],
        attn[:4, :32],
        lmask[:4, :32],
    )  # 4 x 32 tokens: 77 MB of logits, ~110 tokens a chunk
    n = int(lmask[:, 1:].sum())
    want = masked_ce(model(input_ids=ids, attention_mask=attn).logits, ids, lmask).item() * n
    assert sequence_nll(model, ids, attn, lmask) == (pytest.approx(want, rel=1e-5), n)
    assert sequence_nll(model, ids, attn, lmask, plain=False) == (pytest.approx(want, rel=1e-5), n)
    # A small vocabulary in chunks of 3 tokens, and the test set through `evaluate`.
    monkeypatch.setattr(eval_mod, "NLL_CHUNK_BYTES", 3 * 4 * 320)
    path = make_model("qwen2", initializer_range=0.5)
    spec = ModelSpec(name_or_path=str(path))
    small, tok = load_model(spec, "cpu"), load_tokenizer(spec)
    data = DataSpec(split="test", limit=8, synthetic=tiny_data.synthetic)
    nll = tokens = 0.0
    for ex in load_examples(data):  # the old computation, one example at a time (no padding)
        e = encode(tok, spec.prompt_template, ex)
        x, m = (
            torch.as_tensor(e.input_ids, dtype=torch.long)[None],
            torch.as_tensor(e.loss_mask, dtype=torch.bool)[None],
        )
        k = int(m[:, 1:].sum())
        nll += masked_ce(small(input_ids=x).logits, x, m).item() * k
        tokens += k
    got = evaluate(
        EvalConfig(model=str(path), data=data, batch_size=5, max_new_tokens=2, device="cpu"), progress=False
    )
    assert got["perplexity"] == pytest.approx(float(np.exp(nll / tokens)), rel=1e-5)


@torch.inference_mode()
def test_latent_perplexity_from_hidden_states_equals_jacobi_s_logits(make_model, monkeypatch):
    monkeypatch.setattr(eval_mod, "NLL_CHUNK_BYTES", 2 * 4 * 320)  # chunks of 2 tokens
    model = load_model(ModelSpec(name_or_path=str(make_model("qwen2", initializer_range=0.5))), "cpu")
    torch.manual_seed(0)
    head = LatentHead(64, slots=3).eval()
    q, a = torch.randint(0, 320, (3, 7)), torch.randint(0, 320, (3, 5))
    qm, am = torch.ones_like(q), torch.ones_like(a)
    qm[0, :3], q[0, :3] = 0, 0  # left-padded question
    am[1, 3:], a[1, 3:] = 0, 0  # right-padded answer
    P, sel = q.shape[1], am.bool()
    full = jacobi(model, head, q, qm, 2, tail_ids=a, tail_mask=am)["logits"][:, P + 3 - 1 : -1]
    want = torch.nn.functional.cross_entropy(full.float().transpose(1, 2), a, reduction="none")[sel].sum().item()
    run = jacobi(eval_mod._NoLMHead(model), head, q, qm, 2, tail_ids=a, tail_mask=am)
    assert run["logits"].shape[-1] == 64  # hidden states: no vocabulary-wide tensor
    assert hidden_nll(model, run["hidden"][:, P + 3 - 1 : -1][sel], a[sel]).item() == pytest.approx(want, rel=1e-5)


@torch.inference_mode()
def test_a_model_that_soft_caps_its_logits_is_scored_from_its_own_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    assert not plain_head(model)  # logits = 2 tanh(head(h) / 2): not head(h)
    ids = torch.randint(0, 300, (3, 10))
    attn, lmask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    want = masked_ce(model(input_ids=ids, attention_mask=attn).logits, ids, lmask).item() * 27
    assert sequence_nll(model, ids, attn, lmask, plain=False) == (pytest.approx(want, rel=1e-5), 27)


def test_the_trainer_says_once_that_the_cap_binds(tiny_store, tmp_path, capsys):
    from kvdistill.train.loop import train

    common = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        batch_size=4,
        max_steps=2,
        warmup_steps=1,
        device="cpu",
    )
    train(
        TrainConfig(**common, out=str(tmp_path / "a"), shuffle_buffer=16, shuffle_buffer_bytes=100_000), progress=True
    )
    lines = [x for x in capsys.readouterr().out.splitlines() if "shuffle buffer" in x]
    assert (
        len(lines) == 1 and "capped at 1 of --shuffle-buffer 16 samples by --shuffle-buffer-bytes 100000" in lines[0]
    ), lines
    train(
        TrainConfig(**common, out=str(tmp_path / "b"), shuffle_buffer=16), progress=True
    )  # the default cap does not bind
    assert "shuffle buffer" not in capsys.readouterr().out
