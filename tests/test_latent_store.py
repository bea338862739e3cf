"""KaVa latent mode, dump side: a tiny teacher dumped with R-KV compression -> the contract
arrays in the store (zarr and webdataset), verify, the stream and collate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvdistill.align.rkv import importance_from_attention
from kvdistill.core.capture import forward_kv_importance
from kvdistill.core.data import load_examples
from kvdistill.core.prompts import encode, pad_batch
from kvdistill.dump.run import run_dump
from kvdistill.schemas import DEFAULT_TEMPLATE, DumpConfig, JobsConfig, LatentSpec, ModelSpec
from kvdistill.store import (
    ShardReader,
    ShardWriter,
    StoreError,
    finalize,
    format_inspect,
    inspect,
    read_teacher_specs,
)
from kvdistill.store.verify import verify
from kvdistill.train.stream import KVStream, collate


@pytest.fixture(scope="module")
def models(make_model):
    """Teacher and student with 2 layers each: the ratio layer map is the identity. Teacher GQA:
    4 query heads on 2 KV heads of 16 dims (D_t = 32)."""
    teacher = ModelSpec(
        name_or_path=str(make_model("qwen2", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)), name="teacher"
    )
    student = ModelSpec(
        name_or_path=str(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)),
        name="student",
    )
    return teacher, student


@pytest.fixture(scope="module")
def slots(models, tiny_data):
    """M between the shortest and the longest reasoning chain: some chains are padded, some compressed."""
    tok = AutoTokenizer.from_pretrained(models[0].name_or_path)
    lengths = sorted(
        int((encode(tok, DEFAULT_TEMPLATE, ex).segment_ids == 1).sum()) for ex in load_examples(tiny_data)
    )
    assert lengths[0] < lengths[-1]
    return (lengths[0] + lengths[-1]) // 2


def _dump(models, data, store, slots, **kw):
    teacher, student = models
    cfg = DumpConfig(
        teacher=teacher,
        student=student,
        store=str(store),
        data=data,
        num_shards=2,
        batch_size=8,
        device="cpu",
        kv_dtype="float32",
        latent=LatentSpec(slots=slots, lam=0.1),
        **kw,
    )
    for shard in range(2):
        run_dump(DumpConfig.from_dict({**cfg.to_dict(), "shard": shard}), progress=False)
    finalize(store)
    return store


@pytest.fixture(scope="module")
def identity_latent_store(models, slots, tiny_data, tmp_path_factory):
    return _dump(models, tiny_data, tmp_path_factory.mktemp("latent") / "s.zarr", slots)


def test_shard_holds_the_contract_arrays_with_the_right_shapes(identity_latent_store, slots):
    spec = read_teacher_specs(identity_latent_store)["teacher"]
    assert spec.latent == LatentSpec(slots=slots, lam=0.1)
    r = ShardReader(identity_latent_store, "teacher", 0)
    n = len(r)
    lat = r.latent(0, n)
    assert lat["k"].shape == lat["v"].shape == (n, slots, 2, 32) and lat["k"].dtype == np.float32
    assert lat["mask"].shape == (n, slots) and lat["mask"].dtype == np.bool_
    assert lat["pos"].shape == (n, slots, 2, 2) and lat["pos"].dtype == np.int32
    assert lat["hidden"].shape == (n, 64) and lat["hidden"].dtype == np.float32
    seg = r.rows(0, int(r.offsets[-1]), ("segment_ids",))["segment_ids"]
    assert seg.dtype == np.uint8 and len(seg) == r.offsets[-1]
    assert r.latent(1, 3)["k"].shape == (2, slots, 2, 32)


def test_mask_positions_and_gathered_keys_match_the_teacher_exactly(identity_latent_store, models, slots):
    """Short chains padded (mask False, pos -1, zeros), kept positions ascending and inside the
    reasoning span, and latent_k at a slot is the full stored pre-RoPE key at the kept position
    (identity layer and time map: exact)."""
    r = ShardReader(identity_latent_store, "teacher", 0)
    n = len(r)
    lat = r.latent(0, n)
    rows = r.rows(0, int(r.offsets[-1]), ("k", "v", "segment_ids"))
    padded = compressed = 0
    for j in range(n):
        a, b = int(r.offsets[j]), int(r.offsets[j + 1])
        seg = rows["segment_ids"][a:b]
        reasoning = np.flatnonzero(seg == 1)
        R = len(reasoning)
        assert lat["mask"][j].tolist() == [m < min(R, slots) for m in range(slots)]
        pos = lat["pos"][j]  # [M, L_t, H_t]
        real = lat["mask"][j]
        assert (pos[~real] == -1).all() and (lat["k"][j][~real] == 0).all() and (lat["v"][j][~real] == 0).all()
        assert np.all(np.diff(pos[real], axis=0) > 0)  # ascending in time per (layer, head)
        assert np.isin(pos[real], reasoning).all()
        if slots > R:
            padded += 1
            assert (pos[real] == reasoning[:, None, None]).all()  # a short chain keeps all of it
        else:
            compressed += 1
        k = rows["k"][a:b].reshape(-1, 2, 2, 16)  # [T, L, H, d]
        v = rows["v"][a:b].reshape(-1, 2, 2, 16)
        lk, lv = lat["k"][j].reshape(slots, 2, 2, 16), lat["v"][j].reshape(slots, 2, 2, 16)
        for m in np.flatnonzero(real):
            for layer in range(2):
                for h in range(2):
                    assert np.array_equal(lk[m, layer, h], k[pos[m, layer, h], layer, h])
                    assert np.array_equal(lv[m, layer, h], v[pos[m, layer, h], layer, h])
    assert padded and compressed


def test_every_layer_and_head_is_compressed_on_its_own_scores(identity_latent_store):
    """Not layer 0's selection copied (the public prototype's bug): among compressed samples
    some layer 1 / head selection differs from layer 0's."""
    r = ShardReader(identity_latent_store, "teacher", 0)
    lat = r.latent(0, len(r))
    full = lat["mask"].all(axis=1)
    assert full.any()
    pos = lat["pos"][full]  # [n, M, L, H]
    assert any(not np.array_equal(p[:, 1], p[:, 0]) for p in pos)
    assert any(not np.array_equal(p[:, :, 1], p[:, :, 0]) for p in pos)


def test_stored_keys_are_the_teachers_pre_rope_keys_and_hidden_is_before_the_answer(
    identity_latent_store, models, tiny_data
):
    teacher, _ = models
    tok = AutoTokenizer.from_pretrained(teacher.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(teacher.name_or_path).eval()
    model.set_attn_implementation("eager")
    r = ShardReader(identity_latent_store, "teacher", 1)
    rows = {ex.id: ex for ex in load_examples(tiny_data)}
    j = 0
    enc = encode(tok, DEFAULT_TEMPLATE, rows[r.sample_ids[j]])
    with torch.inference_mode():
        out = model.model(input_ids=torch.as_tensor(enc.input_ids[None], dtype=torch.long), use_cache=False)
        k, v, imp, hidden = forward_kv_importance(
            model,
            torch.as_tensor(enc.input_ids[None], dtype=torch.long),
            torch.ones(1, len(enc)),
            torch.as_tensor(enc.segment_ids[None] == 2),
        )
    first_answer = int(np.argmax(enc.segment_ids == 2))
    torch.testing.assert_close(
        torch.from_numpy(r.latent(j, j + 1)["hidden"][0]), out.last_hidden_state[0, first_answer - 1]
    )
    stored = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), ("k",))["k"]
    torch.testing.assert_close(torch.from_numpy(stored), k[0])
    # the hook's importance equals the one computed from output_attentions
    with torch.inference_mode():
        attn = model.model(
            input_ids=torch.as_tensor(enc.input_ids[None], dtype=torch.long), output_attentions=True, use_cache=False
        ).attentions
    for layer, a in enumerate(attn):
        torch.testing.assert_close(
            imp[:, layer], importance_from_attention(a, torch.as_tensor(enc.segment_ids[None] == 2), 2)
        )


def test_verify_passes_and_catches_a_broken_mask(identity_latent_store, tmp_path):
    assert verify(identity_latent_store, progress=False) == []
    info = inspect(identity_latent_store)
    assert (
        info["teachers"]["teacher"]["latent_slots"]
        == ShardReader(identity_latent_store, "teacher", 0).attrs["latent"]["slots"]
    )
    line = next(x for x in format_inspect(info).splitlines() if x.startswith("teacher ") and " identity " in x)
    assert " latent " in format_inspect(info).splitlines()[2] and line.split()[-2] == str(
        info["teachers"]["teacher"]["latent_slots"]
    )
    # a copy with one mask entry flipped: verify names it
    import shutil

    import zarr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(identity_latent_store, bad)
    g = zarr.open_group(bad / "teachers" / "teacher" / "shard-00000", mode="r+")
    m = g["latent_mask"][:]
    m[0, 0] = not m[0, 0]
    g["latent_mask"][:] = m
    found = [p.what for p in verify(bad, progress=False)]
    assert any("latent_mask disagrees with latent_pos" in w for w in found), found


def test_stream_and_collate_return_the_contract_shapes(identity_latent_store, slots):
    stream = KVStream(identity_latent_store, ["teacher"], shuffle_buffer=1, read_latent=True)
    samples = list(stream)
    s = samples[0]
    assert s["segment_ids"].shape == s["input_ids"].shape
    x = s["latent"]["teacher"]
    assert (
        x["k"].shape == x["v"].shape == (slots, 2, 32) and x["mask"].shape == (slots,) and x["hidden"].shape == (64,)
    )
    batch = collate(samples[:3], pad_id=0)
    T = batch["input_ids"].shape[1]
    assert batch["segment_ids"].shape == (3, T) and batch["segment_ids"].dtype == torch.long
    lengths = [len(z["input_ids"]) for z in samples[:3]]
    for i, n in enumerate(lengths):
        assert (batch["segment_ids"][i, n:] == -1).all()
        assert torch.equal(batch["segment_ids"][i, :n], torch.from_numpy(samples[i]["segment_ids"].astype(np.int64)))
    lat = batch["latent"]["teacher"]
    assert lat["k"].shape == lat["v"].shape == (3, slots, 2, 32) and lat["k"].dtype == torch.float32
    assert lat["mask"].shape == (3, slots) and lat["mask"].dtype == torch.bool
    assert lat["hidden"].shape == (3, 64)
    # without read_latent nothing changes
    plain = next(iter(KVStream(identity_latent_store, ["teacher"], shuffle_buffer=1)))
    assert "latent" not in plain and "segment_ids" not in plain
    assert "latent" not in collate([plain], pad_id=0)


def test_a_store_without_latent_or_segment_ids_is_refused_with_the_fix(models, tiny_data, tmp_path):
    teacher, student = models
    plain = tmp_path / "plain.zarr"
    run_dump(
        DumpConfig(
            teacher=teacher,
            student=student,
            store=str(plain),
            data=tiny_data.from_dict({**tiny_data.to_dict(), "limit": 2}),
            device="cpu",
        ),
        progress=False,
    )
    assert ShardReader(plain, "teacher", 0).rows(0, 3, ("segment_ids",))["segment_ids"].shape == (
        3,
    )  # stored without latent too
    with pytest.raises(StoreError, match="without latent mode; re-dump"):
        KVStream(plain, ["teacher"], read_latent=True)
    with pytest.raises(StoreError, match="--latent-slots"):
        ShardReader(plain, "teacher", 0).latent(0, 1)
    with ShardWriter(tmp_path / "old.zarr", "t", 0, num_layers=1, width=4) as w:  # as written before segment_ids
        w.write("x", np.ones((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32), [1, 2], [True, False])
    with pytest.raises(StoreError, match="no segment_ids.*re-dump"):
        ShardReader(tmp_path / "old.zarr", "t", 0).rows(0, 2, ("segment_ids",))


def test_webdataset_backend_carries_the_same_latent_arrays(identity_latent_store, models, slots, tiny_data, tmp_path):
    wds = _dump(models, tiny_data, tmp_path / "w", slots, backend="webdataset")
    assert verify(wds, progress=False) == []
    zs = {s["sample_id"]: s for s in KVStream(identity_latent_store, ["teacher"], shuffle_buffer=1, read_latent=True)}
    ws = list(KVStream(wds, ["teacher"], shuffle_buffer=1, read_latent=True))
    assert len(ws) == len(zs)
    for s in ws:
        z = zs[s["sample_id"]]
        assert np.array_equal(s["segment_ids"], z["segment_ids"])
        for a in ("k", "v", "mask", "hidden"):
            np.testing.assert_allclose(s["latent"]["teacher"][a], z["latent"]["teacher"][a], rtol=1e-5, atol=1e-5)
    members = json.loads((wds / "teachers" / "teacher" / "shard-00000.json").read_text())
    assert members["latent"]["slots"] == slots


def test_jobs_config_passes_latent_to_every_task(models):
    teacher, student = models
    jobs = JobsConfig.from_dict(
        {
            "teachers": [teacher.to_dict()],
            "dump": {
                "student": student.to_dict(),
                "store": "s.zarr",
                "num_shards": 2,
                "latent": {"slots": 6, "lam": 0.3},
            },
        }
    )
    assert all(t.latent == LatentSpec(slots=6, lam=0.3) for t in jobs.tasks())
    assert JobsConfig.from_yaml(jobs.to_yaml()).tasks()[1].latent == LatentSpec(slots=6, lam=0.3)


def test_pad_batch_of_answer_masks_is_boolean_per_token():
    ids, _ = pad_batch([np.array([False, True]), np.array([True])], 0)
    assert ids.bool().tolist() == [[False, True], [True, False]]


def _latent_sample(rng, M, L, D, R, L_t=3, H_t=2, hidden=True):
    """One writer input with R real slots (R <= M)."""
    pos = np.full((M, L_t, H_t), -1, np.int32)
    pos[:R] = np.arange(R)[:, None, None] + 5
    k = rng.standard_normal((M, L, D)).astype(np.float32)
    k[R:] = 0
    out = {"k": k, "v": -k, "mask": np.arange(M) < R, "pos": pos}
    if hidden:
        out["hidden"] = rng.standard_normal(7).astype(np.float32)
    return out


@pytest.mark.parametrize("codec", ["float32", "float16", "bfloat16", "int8"])
def test_writer_round_trips_latent_across_zarr_shard_flushes(tmp_path, monkeypatch, codec):
    """Latent arrays flushed in whole zarr shards mid-write and the rest at close read back per
    sample; they keep the codec's float member (float32 exact, others float16 / bfloat16)."""
    from kvdistill.store import writer

    monkeypatch.setattr(writer, "CHUNK_BYTES", 4 * 4 * 2 * 8 * 2)  # a latent chunk of 2 samples, zarr shard of 32
    rng = np.random.default_rng(0)
    M, L, D, n = 4, 2, 8, 70
    written = []
    with ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=L, width=D, codec=codec, latent_slots=M) as w:
        for j in range(n):
            lat = _latent_sample(rng, M, L, D, R=j % (M + 1))
            written.append(lat)
            T = 3
            w.write(
                f"id-{j}",
                np.ones((T, L, D), np.float32),
                np.ones((T, L, D), np.float32),
                [1, 2, 3],
                [0, 1, 1],
                [0, 1, 2],
                lat,
            )
    r = ShardReader(tmp_path / "s.zarr", "t", 0)
    assert r.attrs["latent"] == {
        "slots": M,
        "codec": {"float32": "float32", "bfloat16": "bfloat16"}.get(codec, "float16"),
        "hidden": True,
    }
    got = r.latent(0, n)
    tol = {"float32": 0, "float16": 1e-3, "int8": 1e-3, "bfloat16": 1e-2}[codec]
    for j, lat in enumerate(written):
        np.testing.assert_allclose(got["k"][j], lat["k"], rtol=tol, atol=tol)
        np.testing.assert_allclose(got["v"][j], lat["v"], rtol=tol, atol=tol)
        assert np.array_equal(got["mask"][j], lat["mask"]) and np.array_equal(got["pos"][j], lat["pos"])
        assert np.array_equal(got["hidden"][j], lat["hidden"])
    assert np.array_equal(r.latent(33, 35)["pos"], got["pos"][33:35])
    assert np.array_equal(r.rows(0, 6, ("segment_ids",))["segment_ids"], [0, 1, 2, 0, 1, 2])


def test_writer_refuses_inconsistent_latent_input_naming_the_problem(tmp_path):
    rng = np.random.default_rng(0)
    kv = np.zeros((2, 1, 4), np.float32)
    with ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=1, width=4, latent_slots=3) as w:
        with pytest.raises(ValueError, match="pass latent="):
            w.write("a", kv, kv, [1, 2], [0, 1], [0, 2])
        bad = _latent_sample(rng, 3, 1, 4, R=2)
        bad["mask"] = np.array([True, True, True])  # slot 2 is padding in pos
        with pytest.raises(ValueError, match="pos must be >= 0 exactly at the mask"):
            w.write("b", kv, kv, [1, 2], [0, 1], [0, 2], bad)
        with pytest.raises(ValueError, match=r"latent k has shape \(2, 1, 4\), expected \(3, 1, 4\)"):
            w.write(
                "c", kv, kv, [1, 2], [0, 1], [0, 2], {**_latent_sample(rng, 3, 1, 4, R=2), "k": np.zeros((2, 1, 4))}
            )
        w.write("d", kv, kv, [1, 2], [0, 1], [0, 2], _latent_sample(rng, 3, 1, 4, R=2))
        with pytest.raises(ValueError, match="for every sample of a shard or for none"):
            w.write("e", kv, kv, [1, 2], [0, 1], None, _latent_sample(rng, 3, 1, 4, R=2))
    with (
        ShardWriter(tmp_path / "s2.zarr", "t", 0, num_layers=1, width=4) as w,
        pytest.raises(ValueError, match="no latent_slots"),
    ):
        w.write("a", kv, kv, [1, 2], [0, 1], [0, 2], _latent_sample(rng, 3, 1, 4, R=2))


def test_an_empty_latent_shard_still_has_every_array(tmp_path):
    with ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=2, width=4, latent_slots=3):
        pass
    r = ShardReader(tmp_path / "s.zarr", "t", 0)
    lat = r.latent(0, 0)
    assert lat["k"].shape == (0, 3, 2, 4) and lat["mask"].shape == (0, 3) and "hidden" not in lat
    assert r.rows(0, 0, ("segment_ids",))["segment_ids"].shape == (0,)


def test_converting_between_backends_keeps_segment_ids_and_latent_arrays(identity_latent_store, tmp_path):
    from kvdistill.store import wds_to_zarr, zarr_to_wds

    back = wds_to_zarr(zarr_to_wds(identity_latent_store, tmp_path / "w"), tmp_path / "z.zarr")
    assert verify(back, progress=False) == []
    a, b = ShardReader(identity_latent_store, "teacher", 1), ShardReader(back, "teacher", 1)
    for x, y in zip(a.latent(0, len(a)).values(), b.latent(0, len(b)).values(), strict=True):
        assert np.array_equal(x, y)
    n = int(a.offsets[-1])
    assert np.array_equal(a.rows(0, n, ("segment_ids",))["segment_ids"], b.rows(0, n, ("segment_ids",))["segment_ids"])


def test_a_latent_store_with_an_empty_shard_verifies(models, tiny_data, tmp_path):
    teacher, student = models
    data = tiny_data.from_dict({**tiny_data.to_dict(), "limit": 1})  # 2 shards of 1 row: shard 0 is empty
    for shard in range(2):
        run_dump(
            DumpConfig(
                teacher=teacher,
                student=student,
                store=str(tmp_path / "s.zarr"),
                data=data,
                num_shards=2,
                shard=shard,
                device="cpu",
                latent=LatentSpec(slots=4),
                allow_empty=True,
            ),
            progress=False,
        )
    finalize(tmp_path / "s.zarr")
    assert len(ShardReader(tmp_path / "s.zarr", "teacher", 0)) == 0
    assert verify(tmp_path / "s.zarr", progress=False) == []


def test_latent_slots_get_the_same_pca_projection_as_the_full_kv_and_padding_stays_zero(models, tiny_data, tmp_path):
    """With a projection the heads mix, so compare where they cannot differ: in a chain shorter
    than M every head keeps every reasoning token, and slot m is the projected full K/V at pos[m]."""
    teacher, student = models
    rng = np.random.default_rng(0)
    L, D, dim = 2, 32, 12
    arrays = {
        f"{p}_{a}": rng.standard_normal(shape).astype(np.float32)
        for p in "kv"
        for a, shape in (("mean", (L, D)), ("components", (L, D, dim)))
    }
    arrays |= {"k_evr": np.full((L, dim), 0.01, np.float32), "v_evr": np.full((L, dim), 0.01, np.float32)}
    arrays["layer_map"] = np.eye(L, dtype=np.float32)  # fitted under the dump's ratio map (2 -> 2 layers: identity)
    np.savez(tmp_path / "pca.npz", **arrays)
    store = tmp_path / "p.zarr"
    data = tiny_data.from_dict({**tiny_data.to_dict(), "limit": 8})
    run_dump(
        DumpConfig(
            teacher=teacher,
            student=student,
            store=str(store),
            data=data,
            device="cpu",
            kv_dtype="float32",
            align={"projection": str(tmp_path / "pca.npz")},
            latent=LatentSpec(slots=40),
        ),
        progress=False,
    )
    r = ShardReader(store, "teacher", 0)
    lat = r.latent(0, len(r))
    assert lat["k"].shape == (len(r), 40, 2, dim)
    for j in range(len(r)):
        real = lat["mask"][j]
        assert 0 < real.sum() < 40  # every chain is shorter than 40 tokens here
        rows = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), ("k", "v"))
        p = lat["pos"][j][real][:, 0, 0]
        for part in ("k", "v"):
            np.testing.assert_allclose(lat[part][j][real], rows[part][p], rtol=1e-5, atol=1e-5)
            assert (lat[part][j][~real] == 0).all()  # not -mean @ components
