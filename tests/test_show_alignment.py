"""`kvdistill store show-alignment`: a sample's time map and layer map rebuilt from the store alone
are the ones the dump aligned with (identity, char overlap across tokenizers, per-segment
resampling), the command writes a PNG, and what it cannot find is one line with exit code 3."""

from __future__ import annotations

import dataclasses
import shutil
import struct

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvdistill.align.layers import apply_layer_map, ratio_layer_map
from kvdistill.align.time import char_overlap_time_map, identity_time_map, segment_time_map
from kvdistill.cli import main
from kvdistill.core.capture import forward_kv
from kvdistill.core.data import load_examples
from kvdistill.core.prompts import encode
from kvdistill.dump.run import run_dump
from kvdistill.dump.show_alignment import (
    SampleAlignment,
    alignment_figure,
    plot_alignment,
    reconstruct,
    summary,
    visible,
    window,
)
from kvdistill.errors import ExitCode
from kvdistill.schemas import DEFAULT_TEMPLATE, DumpConfig, ModelSpec
from kvdistill.store import ShardReader, finalize, zarr_to_wds
from kvdistill.store.layout import KEY, TOKENIZERS
from kvdistill.store.verify import verify

THINK = "Solve it step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\nFinal answer: {answer}"


@pytest.fixture(scope="module")
def xstore(tiny_store, other_tokenizer_teacher, tmp_path_factory):
    """One finalized shard of three teachers: identity (teacher-a), char_overlap (xtok: other
    tokenizer) and segment_linear (think: teacher-a's weights under another template)."""
    store = tmp_path_factory.mktemp("show") / "x.zarr"
    plain = tiny_store["teachers"][0]
    teachers = [
        plain,
        ModelSpec(name_or_path=str(other_tokenizer_teacher), name="xtok"),
        ModelSpec(name_or_path=plain.name_or_path, name="think", prompt_template=THINK),
    ]
    for t in teachers:
        cfg = DumpConfig(
            teacher=t,
            student=tiny_store["student"],
            store=str(store),
            data=tiny_store["data"],
            batch_size=8,
            device="cpu",
            kv_dtype="float32",
        )
        run_dump(cfg, progress=False)
    finalize(store)
    return store


def _sample(store, teacher: str = "xtok", j: int = 0) -> str:
    return ShardReader(store, teacher, 0).sample_ids[j]


def _independent(tiny_store, teacher_path: str, template: str, sid: str):
    """Both sides' tokenizations as the dump makes them, from the original checkpoints and data."""
    ex = {e.id: e for e in load_examples(tiny_store["data"])}[sid]
    s = encode(AutoTokenizer.from_pretrained(tiny_store["student"].name_or_path), DEFAULT_TEMPLATE, ex)
    t = encode(AutoTokenizer.from_pretrained(teacher_path), template, ex)
    return ex, s, t


# --- the maps are the dump's ---------------------------------------------------------------------


def test_an_identity_store_rebuilds_the_identity_time_map_on_the_stored_tokens(tiny_store):
    sid = ShardReader(tiny_store["store"], "teacher-b", 1).sample_ids[2]
    a = reconstruct(tiny_store["store"], "teacher-b", sid)
    r = ShardReader(tiny_store["store"], "teacher-b", 1)
    T = int(r.offsets[3] - r.offsets[2])
    assert a.time_map.kind == "identity" and a.time_map.shape == (T, T) and a.shard == 1
    assert torch.equal(a.time_map.dense(), torch.eye(T, dtype=torch.float64))
    assert a.student_tokens == a.teacher_tokens and len(a.student_tokens) == T
    assert a.student_tokens[-1] == "<|endoftext|>" and not a.notes  # EOS by name; text and tokenizers from the store


def test_a_cross_tokenizer_map_equals_char_overlap_of_the_two_tokenizations(
    tiny_store, other_tokenizer_teacher, xstore
):
    sid = _sample(xstore, "xtok", 1)
    a = reconstruct(xstore, "xtok", sid)
    _, s, t = _independent(tiny_store, str(other_tokenizer_teacher), DEFAULT_TEMPLATE, sid)
    expected = char_overlap_time_map(s.offsets, t.offsets).dense()
    assert a.time_map.kind == "char_overlap" and a.time_map.shape == (len(s), len(t)) and len(s) != len(t)
    assert torch.equal(a.time_map.dense(), expected)  # bit for bit: the same function on the same spans
    np.testing.assert_allclose(a.time_map.dense().sum(1).numpy(), 1.0, rtol=0, atol=1e-12)  # rows are stochastic
    assert (np.bincount(a.time_map.cols.numpy()) > 1).any()  # coarser teacher tokens are shared by student tokens
    assert len(a.teacher_tokens) == len(t) and np.array_equal(a.teacher_segments, t.segment_ids)


def test_the_rebuilt_cross_tokenizer_map_reproduces_the_stored_k_from_the_teacher(
    tiny_store, other_tokenizer_teacher, xstore
):
    """The map is the one the K/V were aligned with: A @ (teacher K, layer-mapped) == stored K."""
    sid = _sample(xstore, "xtok", 0)
    a = reconstruct(xstore, "xtok", sid)
    _, _, t = _independent(tiny_store, str(other_tokenizer_teacher), DEFAULT_TEMPLATE, sid)
    model = AutoModelForCausalLM.from_pretrained(str(other_tokenizer_teacher)).eval()
    ids = torch.as_tensor(t.input_ids, dtype=torch.long)[None]
    with torch.no_grad():
        k, _ = forward_kv(model, ids, torch.ones_like(ids))
    k_t = apply_layer_map(torch.as_tensor(a.layer_map), k[0].double())  # [T_t, L_s, D]
    r = ShardReader(xstore, "xtok", 0)
    stored = r.rows(int(r.offsets[0]), int(r.offsets[1]), ("k",))["k"]
    np.testing.assert_allclose(torch.einsum("st,tld->sld", a.time_map.dense(), k_t).numpy(), stored, rtol=0, atol=1e-5)


def test_a_dual_template_map_equals_per_segment_resampling(tiny_store, xstore):
    sid = _sample(xstore, "think", 3)
    a = reconstruct(xstore, "think", sid)
    _, s, t = _independent(tiny_store, tiny_store["teachers"][0].name_or_path, THINK, sid)
    assert a.time_map.kind == "segment_linear" and len(s) != len(t)
    assert torch.equal(a.time_map.dense(), segment_time_map(s.segment_ids, t.segment_ids).dense())
    assert "".join(a.teacher_tokens[:-1]).startswith(
        "Solve␣it␣step␣by␣step.↵Question:"
    )  # the teacher's own text, whitespace shown
    assert not "".join(a.student_tokens).startswith("Solve")


def test_the_layer_map_is_the_teacher_specs_ratio_map(xstore):
    a = reconstruct(xstore, "xtok", _sample(xstore))
    assert a.layer_map_source == "ratio" and a.similarity is None
    np.testing.assert_array_equal(a.layer_map, ratio_layer_map(3, 2).numpy())  # xtok: 3 layers onto the student's 2


def test_the_summary_line_counts_what_the_picture_shows(xstore):
    a = reconstruct(xstore, "xtok", _sample(xstore))
    line = summary(a)
    reads, feeds = (
        np.bincount(a.time_map.rows.numpy()),
        np.bincount(a.time_map.cols.numpy(), minlength=a.time_map.shape[1]),
    )
    assert (
        "\n" not in line
        and f"time map char_overlap {a.time_map.shape[0]} student x {a.time_map.shape[1]} teacher tokens" in line
    )
    assert (
        f"{(reads > 1).sum()} student tokens read >1 teacher token" in line
        and f"{(feeds > 1).sum()} teacher tokens feed >1 student token" in line
    )
    assert (feeds > 1).sum() > 0 and "layer map ratio 2 student <- 3 teacher layers" in line


def test_whitespace_is_visible_and_long_tokens_are_cut():
    assert visible(" 12\n") == "␣12↵" and visible("\t") == "⇥"
    assert visible("x" * 30) == "x" * 13 + "…"


def test_a_long_sample_is_windowed_to_max_tokens(xstore):
    a = reconstruct(xstore, "xtok", _sample(xstore))
    r0, r1, c0, c1, c_end = window(a, 10, start=5)
    assert (r0, r1) == (5, 15) and c0 <= c1 <= c_end
    cols = a.time_map.cols.numpy()[(a.time_map.rows.numpy() >= 5) & (a.time_map.rows.numpy() < 15)]
    assert (c0, c_end) == (cols.min(), cols.max() + 1)


# --- stores: webdataset, older ones --------------------------------------------------------------


def test_a_webdataset_copy_rebuilds_the_same_map_and_the_store_verifies(xstore, tmp_path):
    assert verify(xstore) == []  # the stored texts are checked too
    wds = zarr_to_wds(xstore, tmp_path / "x.wds")
    sid = _sample(xstore, "xtok", 2)
    assert torch.equal(
        reconstruct(wds, "xtok", sid).time_map.dense(), reconstruct(xstore, "xtok", sid).time_map.dense()
    )


def _strip_records(store) -> None:
    """Make `store` look written before kvdistill recorded tokenizers and sample texts."""
    shutil.rmtree(store / TOKENIZERS)
    for d in (store / "teachers").glob("*/shard-*"):
        shutil.rmtree(d / "examples", ignore_errors=True)
    finalize(store)  # the consolidated metadata forgets them too


def test_an_older_store_is_rebuilt_from_its_recorded_paths_and_data(xstore, tmp_path):
    old = tmp_path / "old.zarr"
    shutil.copytree(xstore, old)
    _strip_records(old)
    sid = _sample(xstore, "xtok", 1)
    a = reconstruct(old, "xtok", sid)
    assert torch.equal(a.time_map.dense(), reconstruct(xstore, "xtok", sid).time_map.dense())
    assert any("reloaded from synthetic" in n for n in a.notes) and any("not verifiable" in n for n in a.notes)


# --- the command ---------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_command_prints_the_summary_and_writes_a_png(xstore, tmp_path, capsys):
    out = tmp_path / "fig" / "align.png"
    sid = _sample(xstore)
    assert (
        main(
            [
                "store",
                "show-alignment",
                str(xstore),
                "--teacher",
                "xtok",
                "--sample",
                sid,
                "--out",
                str(out),
                "--max-tokens",
                "40",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith(f"xtok / {sid} (shard 0): time map char_overlap") and stdout[1] == f"wrote {out}"
    w, h = _png_size(out)
    assert out.stat().st_size > 20_000 and 600 < w < 4000 and 500 < h < 4000


def test_a_calibrated_layer_map_is_drawn_beside_its_similarity(xstore, tmp_path):
    a = reconstruct(xstore, "xtok", _sample(xstore))
    cka = dataclasses.replace(
        a,
        layer_map_source="runs/layermap.json",
        similarity=np.linspace(0, 1, 6).reshape(2, 3),
        layer_map=np.array([[0.6, 0.4, 0], [0, 0.3, 0.7]]),
    )
    assert "layer map CKA (layermap.json) 2 student <- 3 teacher layers, 2 mix >1 teacher layer" in summary(cka)
    w_plain, _ = _png_size(plot_alignment(a, tmp_path / "plain.png", max_tokens=20))
    w_cka, _ = _png_size(plot_alignment(cka, tmp_path / "cka.png", max_tokens=20))
    assert w_cka > w_plain  # one more panel


def _deep(L_s: int, L_t: int) -> SampleAlignment:
    """A short sample onto a deep teacher: a CKA similarity [L_s, L_t] and its top-2 layer map."""
    rng = np.random.default_rng(0)
    sim = rng.uniform(0.05, 1.0, (L_s, L_t))
    W = np.zeros_like(sim)
    for s, row in enumerate(sim):
        top = np.argsort(row)[-2:]
        W[s, top] = row[top] / row[top].sum()
    T = 12
    tokens = [f"tok{i}" for i in range(T)]
    seg = np.zeros(T, np.uint8)
    return SampleAlignment(
        "deep.zarr", "teacher-30", "x", 0, "identity", identity_time_map(T), tokens, tokens, seg, seg, W,
        "runs/layermap.json", sim,
    )  # fmt: skip


def _every_kth(ticks: list[int], n: int) -> bool:
    """0, k, 2k, ... up to the last layer (at most 12 of them), and maybe the last layer n - 1."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    body = ticks[:-1] if ticks[-1] == n - 1 and (n - 1) % step else ticks
    return body == list(range(0, n, step)) and len(body) <= 12


@pytest.mark.parametrize("L_s, L_t", [(10, 30), (30, 30), (48, 80)])
def test_a_deep_teachers_layer_panels_name_every_kth_layer_and_no_label_overlaps(L_s, L_t):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    a = _deep(L_s, L_t)
    fig = alignment_figure(a)
    FigureCanvasAgg(fig).draw()
    r = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_title().startswith(("layer map", "CKA"))]
    assert len(panels) == 2
    for ax in panels:
        x = [int(t.get_text()) for t in ax.get_xticklabels()]
        y = [int(t.get_text()) for t in ax.get_yticklabels()]
        assert _every_kth(x, L_t) and _every_kth(y, L_s)
        if L_t == 30:
            assert x == [0, 5, 10, 15, 20, 25, 29]
        if L_s == 10:
            assert y == list(range(10))
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [t.get_window_extent(r) for t in labels]
            assert not any(p.overlaps(q) for p, q in zip(boxes, boxes[1:], strict=False)), labels
    cell = np.diff(panels[0].transData.transform([(0, 0), (1, 0)])[:, 0])[0]  # pixels per layer
    texts = panels[0].texts
    if L_t <= 30:  # each weight written inside its cell (.52: a 30-layer map's cells hold it)
        assert len(texts) == np.count_nonzero(a.layer_map)
        assert all(t.get_window_extent(r).width < cell and t.get_window_extent(r).height < cell for t in texts)
    else:  # an 80-layer map's cells do not: the title says the colour tells the weight
        assert len(texts) == 0 and "cells too small to write in" in panels[0].get_title()


def test_inspect_points_at_the_command(xstore, capsys):
    assert main(["store", "inspect", str(xstore)]) == 0
    assert "kvdistill store show-alignment STORE --teacher T --sample ID" in capsys.readouterr().out


def _fails(argv, capsys) -> str:
    assert main(argv) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("kvdistill store:") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_an_unknown_teacher_is_one_line_listing_the_teachers(xstore, tmp_path, capsys):
    err = _fails(
        [
            "store",
            "show-alignment",
            str(xstore),
            "--teacher",
            "nobody",
            "--sample",
            "x",
            "--out",
            str(tmp_path / "a.png"),
        ],
        capsys,
    )
    assert "has no teacher 'nobody'; it holds ['teacher-a', 'think', 'xtok']" in err
    assert not (tmp_path / "a.png").exists()


def test_an_unknown_sample_is_one_line_naming_it(xstore, tmp_path, capsys):
    err = _fails(
        [
            "store",
            "show-alignment",
            str(xstore),
            "--teacher",
            "xtok",
            "--sample",
            "nope",
            "--out",
            str(tmp_path / "a.png"),
        ],
        capsys,
    )
    assert "teacher 'xtok' holds no sample 'nope' (48 samples, e.g. " in err


def test_a_start_past_the_sample_is_one_line(xstore, tmp_path, capsys):
    err = _fails(
        [
            "store",
            "show-alignment",
            str(xstore),
            "--teacher",
            "xtok",
            "--sample",
            _sample(xstore),
            "--out",
            str(tmp_path / "a.png"),
            "--start",
            "9999",
        ],
        capsys,
    )
    assert "--start 9999" in err


def test_an_older_store_whose_data_is_gone_says_what_is_missing_and_how_to_fix_it(xstore, tmp_path, capsys):
    old = tmp_path / "old.zarr"
    shutil.copytree(xstore, old)
    root = zarr.open_group(old, mode="r+")
    meta = root.attrs[KEY]
    root.attrs[KEY] = {
        **meta,
        "store_spec": {
            **meta["store_spec"],
            "data": {**meta["store_spec"]["data"], "source": str(tmp_path / "gone.jsonl")},
        },
    }
    _strip_records(old)
    argv = [
        "store",
        "show-alignment",
        str(old),
        "--teacher",
        "xtok",
        "--sample",
        _sample(xstore),
        "--out",
        str(tmp_path / "a.png"),
    ]
    err = _fails(argv, capsys)
    assert (
        "holds no text for sample" in err
        and "written before kvdistill recorded sample texts" in err
        and "re-dump into a new --store" in err
    )
    # An identity teacher needs no text: the stored tokens are its whole time map.
    assert main([*argv[:3], "--teacher", "teacher-a", *argv[5:]]) == 0
    assert "token strings decoded from the stored ids" in capsys.readouterr().out
