"""`kvdistill align calibrate`: CKA layer map + heatmap + PCA, consumed by `kvdistill dump`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from kvdistill.align.layers import ratio_layer_map
from kvdistill.cli import main
from kvdistill.schemas import TrainConfig
from kvdistill.store import ShardReader, finalize, read_teacher_specs
from kvdistill.train.loop import train


@pytest.fixture(scope="module")
def calibrated(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "layermap.json"
    teacher = tiny_store["teachers"][0].name_or_path  # 3 layers, D = 64
    student = tiny_store["student"].name_or_path  # 2 layers, D = 32
    rc = main(
        [
            "align",
            "calibrate",
            "--teacher",
            teacher,
            "--student",
            student,
            "--samples",
            "12",
            "--top-k",
            "2",
            "--pca",
            "8",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_calibrate_writes_the_similarity_matrix_the_top_k_map_a_heatmap_and_a_pca(calibrated):
    d = json.loads(calibrated.read_text())
    assert d["method"] == "debiased_linear_cka" and d["teacher_layers"] == 3 and d["student_layers"] == 2
    sim, W = np.array(d["similarity"]), np.array(d["map"])
    assert sim.shape == (2, 3) and np.isfinite(sim).all() and (sim <= 1 + 1e-9).all()
    assert W.shape == (2, 3) and np.allclose(W.sum(1), 1) and ((W > 0).sum(1) <= 2).all()
    for s in range(2):  # the kept layers are the most similar ones
        kept = set(np.nonzero(W[s])[0])
        assert kept <= set(np.argsort(-sim[s])[:2])
    assert d["meta"]["tokens"] > 0 and d["meta"]["time_map"] == "identity"
    assert calibrated.with_suffix(".png").stat().st_size > 1000
    z = np.load(calibrated.with_name("layermap-pca8.npz"))
    assert z["k_components"].shape == (2, 64, 8) and z["v_mean"].shape == (2, 64)
    assert (np.diff(z["k_evr"], axis=-1) <= 1e-12).all() and (z["k_evr"].sum(-1) <= 1 + 1e-9).all()


def test_dump_uses_the_calibrated_map_and_projection_and_the_store_records_them(tiny_store, calibrated, tmp_path):
    store = tmp_path / "s.zarr"
    teacher = tiny_store["teachers"][0]
    for shard in range(2):
        rc = main(
            [
                "dump",
                "--teacher",
                teacher.name_or_path,
                "--teacher-name",
                "a-cka",
                "--student",
                tiny_store["student"].name_or_path,
                "--store",
                str(store),
                "--num-shards",
                "2",
                "--shard",
                str(shard),
                "--layer-map",
                str(calibrated),
                "--projection",
                str(calibrated.with_name("layermap-pca8.npz")),
                "--limit",
                "48",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        assert rc == 0
    finalize(store)
    spec = read_teacher_specs(store)["a-cka"]
    d = json.loads(calibrated.read_text())
    assert spec.layer_map == d["map"] and spec.layer_similarity == d["similarity"]
    assert spec.width == 8 and spec.projection["dim"] == 8 and len(spec.projection["k_explained_variance"]) == 2
    assert ShardReader(store, "a-cka", 0).group["k"].shape[1:] == (2, 8)
    proj = zarr.open_group(store / "teachers" / "a-cka" / "projection", mode="r")
    np.testing.assert_array_equal(
        proj["k_components"][:], np.load(calibrated.with_name("layermap-pca8.npz"))["k_components"]
    )
    summary = train(
        TrainConfig(
            store=str(store),
            student=tiny_store["student"],
            out=str(tmp_path / "run"),
            batch_size=8,
            max_steps=3,
            device="cpu",
        ),
        progress=False,
    )
    assert summary["steps"] == 3 and np.isfinite(summary["mean_last_20_kv_k"])


def test_a_layer_map_for_another_depth_is_a_clear_error(tiny_store, calibrated, tmp_path, capsys):
    other = tiny_store["teachers"][1].name_or_path  # 2 layers, not 3
    rc = main(
        [
            "dump",
            "--teacher",
            other,
            "--student",
            tiny_store["student"].name_or_path,
            "--store",
            str(tmp_path / "x.zarr"),
            "--layer-map",
            str(calibrated),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 3  # bad input
    err = capsys.readouterr().err
    assert "3-layer teacher" in err and "2 layers" in err and "kvdistill align calibrate" in err


def test_a_projection_fitted_under_another_layer_map_is_refused_and_pca_layer_map_fits_under_the_dumps(
    tiny_store, calibrated, tmp_path, capsys
):
    teacher, student = tiny_store["teachers"][0].name_or_path, tiny_store["student"].name_or_path
    pca = calibrated.with_name("layermap-pca8.npz")  # fitted under the CKA map
    dump = ["dump", "--teacher", teacher, "--student", student, "--store", str(tmp_path / "x.zarr"), "--projection"]
    rc = main([*dump, str(pca), "--layer-map", "ratio", "--limit", "8", "--device", "cpu", "--no-progress"])
    assert rc == 3 and not (tmp_path / "x.zarr").exists()
    err = capsys.readouterr().err.strip()
    assert (
        "was fitted under another layer map" in err and "--pca-layer-map ratio" in err and len(err.splitlines()) == 1
    )
    out = tmp_path / "r" / "layermap.json"
    assert (
        main(
            [
                "align",
                "calibrate",
                "--teacher",
                teacher,
                "--student",
                student,
                "--samples",
                "12",
                "--pca",
                "4",
                "--pca-layer-map",
                "ratio",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    z = np.load(out.with_name("layermap-pca4.npz"))
    assert np.allclose(z["layer_map"], ratio_layer_map(3, 2).numpy())
    assert (
        main(
            [
                *dump,
                str(out.with_name("layermap-pca4.npz")),
                "--layer-map",
                "ratio",
                "--limit",
                "8",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    older = {k: z[k] for k in z.files if k != "layer_map"}  # a file from before the map was recorded
    np.savez(tmp_path / "old.npz", **older)
    assert (
        main(
            [
                *dump,
                str(tmp_path / "old.npz"),
                "--layer-map",
                "ratio",
                "--limit",
                "8",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 3
    )
    assert "records no layer map" in capsys.readouterr().err
