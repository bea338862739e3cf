"""The common Z space (train/zspace.py): off it changes nothing, its losses are masked and
scale-free, a collapsed Z is never a low loss, the guard keeps optimised maps from collapsing
(and without it they do: to a point without standardisation, to a few directions without
whitening when teacher and student share factors), and a Z run trains, saves its sample and is
drawn by the report."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import transformers

from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.train.distiller import Distiller, KVShapes
from kvdistill.train.loop import train
from kvdistill.train.report import ZSPACE_SAMPLE, run_report
from kvdistill.train.stream import KVStream, collate
from kvdistill.train.zspace import Z_LOSSES, ZSpace, collapse_stats, standardize, z_loss

WIDTHS = {"teacher-a": 64, "teacher-b": 16}  # tiny_store's teachers (K width), student 2 layers x 32


def _zspace(widths: dict[str, int], student_width: int, z_dim: int, *, standardize=True, whiten=None, **cfg):
    """A ZSpace over 2 layers, from a TrainConfig with these z_* / kv_norm fields. Learned maps
    with mse / cosine, which TrainConfig refuses, are set after its validation: the tests show
    the collapse that refusal prevents."""
    maps = cfg.pop("z_teacher_maps", "fixed")
    cfg = TrainConfig(store="s", student={"name_or_path": "x"}, out="o", z_dim=z_dim, **cfg)
    cfg.z_teacher_maps = maps
    return ZSpace(cfg, KVShapes(widths, 2, student_width), standardize=standardize, whiten=whiten)


def _batch(tiny_store, n: int = 6):
    return collate(list(KVStream(tiny_store["store"], list(WIDTHS), shuffle_buffer=1))[:n], pad_id=0)


def _distiller(tiny_store, seed: int = 0, **kw) -> Distiller:
    torch.manual_seed(seed)
    student = transformers.AutoModelForCausalLM.from_pretrained(tiny_store["student"].name_or_path)
    cfg = TrainConfig(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out="unused",
        cka_weight=0.05,
        fusion="similarity",
        **kw,
    )
    return Distiller(cfg, student, KVShapes(WIDTHS, 2, 32))


def test_z_dim_0_leaves_the_distiller_bit_identical_to_one_built_without_the_z_fields(tiny_store):
    batch = _batch(tiny_store)
    plain = _distiller(tiny_store)
    off = _distiller(tiny_store, z_dim=0, z_loss="cca", z_teacher_maps="learned", z_offdiag_weight=0.5)
    assert off.zspace is None and plain.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in plain.state_dict().items())
    outs = []
    for model in (plain, off):
        out = model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["kv"], step=3)
        out["loss"].backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    assert a.keys() == b.keys() and not any(k.startswith("z") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # and it can fail: Z space on replaces the K/V terms
    on = _distiller(tiny_store, z_dim=8)(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["kv"], step=3
    )
    assert "z" in on and "kv_k" not in on and not torch.equal(on["loss"], a["loss"])


def _z(n_tokens: int = 4096, layers: int = 2, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(8, n_tokens // 8, layers, dim, generator=g)
    mask = torch.ones(z.shape[:2], dtype=torch.bool)
    mask[:, -5:] = False  # padded tail
    return z, mask


@pytest.mark.parametrize("kind, whiten", [(k, False) for k in Z_LOSSES] + [("barlow", True), ("cca", True)])
def test_each_z_loss_is_about_zero_for_identical_sides_positive_otherwise_and_blind_to_padding(kind, whiten):
    a, mask = _z(seed=0)
    b, _ = _z(seed=1)
    a, b = standardize(a, mask), standardize(b, mask)
    same, per_layer = z_loss(a, a, mask, kind, whiten=whiten)
    assert per_layer.shape == (2,) and same < 0.01, same
    other = z_loss(a, b, mask, kind, whiten=whiten)[0]
    assert other > 0.5, other  # independent sides: mse ~2, cosine / barlow / cca ~1
    nan = torch.full_like(a, float("nan"))
    pad = ~mask[:, :, None, None]
    assert torch.equal(z_loss(torch.where(pad, nan, a), torch.where(pad, 1e6, b), mask, kind, whiten=whiten)[0], other)
    # standardisation reads real tokens only, so garbage in the padding changes no real token
    raw, _ = _z(seed=2)
    assert torch.equal(standardize(raw, mask)[mask], standardize(torch.where(pad, 1e6, raw), mask)[mask])


@pytest.mark.parametrize(
    "kind, teacher_maps", [(k, "fixed") for k in Z_LOSSES] + [("barlow", "learned"), ("cca", "learned")]
)
def test_a_collapsed_z_scores_at_least_one_for_every_loss_with_the_default_guard(kind, teacher_maps):
    """Bound (train/zspace.py, guard 2): a Z constant over the tokens standardises to 0, so
    against a standardised, non-constant target it scores mse = mean var / (var + eps) >= 1 - 1e-4
    here, cosine 1, barlow and cca >= 1 (whitened too), where identical sides score ~0 (test above)."""
    g = torch.Generator().manual_seed(0)
    zspace = _zspace(WIDTHS, 32, 8, z_loss=kind, z_teacher_maps=teacher_maps)  # the default guard: standardised Z
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[0, 50:] = False
    one_token = torch.randn(1, 1, 2, 32, generator=g)
    student = (one_token.expand(4, 64, 2, 32), (2 * one_token).expand(4, 64, 2, 32))  # the same K, V at every token
    teachers = {
        t: (torch.randn(4, 64, 2, w, generator=g), torch.randn(4, 64, 2, w, generator=g)) for t, w in WIDTHS.items()
    }
    out = zspace(student, teachers, mask)
    assert (out.per_layer >= 1 - 1e-4).all(), out.per_layer
    assert out.std < 1e-5 and out.erank == 0  # the collapse statistics see it
    # A student that is not collapsed scores below the bound only by correlating with the target:
    # here it is the target itself.
    assert z_loss(out.target, out.target, mask, kind, whiten=zspace.whiten)[0] < 0.02
    # Both sides collapsed: cosine, barlow and cca still score >= 1; mse scores ~0, which is why
    # trained teacher maps are allowed with barlow / cca only (TrainConfig.validate).
    both = z_loss(out.student, torch.zeros_like(out.student), mask, kind, whiten=zspace.whiten)[0]
    assert (both < 1e-6) if kind == "mse" else (both >= 1 - 1e-6), both


def _random_kv(g: torch.Generator, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 32, 2, width, generator=g), torch.randn(8, 32, 2, width, generator=g)


def _optimise_maps(
    teacher_maps: str, kind: str, standardize: bool, steps: int = 150
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Adam on the maps alone (no student) over independent random K/V, where nothing can be
    matched and the only way down is collapse. Returns the student's (z_std, z_erank) at init and
    at the end, and the teacher's z_std at the end."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    zspace = _zspace(
        {"t": 24}, 16, 8, z_loss=kind, z_teacher_maps=teacher_maps, kv_norm="none", standardize=standardize
    )
    mask = torch.ones(8, 32, dtype=torch.bool)
    mask[:, 28:] = False
    opt = torch.optim.Adam(zspace.parameters(), lr=1e-2)
    first = None
    for _ in range(steps):
        out = zspace(_random_kv(g, 16), {"t": _random_kv(g, 24)}, mask)
        first = first or (out.std.item(), out.erank.item())
        opt.zero_grad()
        out.per_layer.mean().backward()
        opt.step()
    with torch.no_grad():
        s, t = _random_kv(g, 16), {"t": _random_kv(g, 24)}
        out = zspace(s, t, mask)
        teacher_std = collapse_stats(zspace.embed(t["t"], mask, "t"), mask)[0].item()
    return first, (out.std.item(), out.erank.item()), teacher_std


@pytest.mark.parametrize(
    "teacher_maps, kind", [("fixed", k) for k in Z_LOSSES] + [("learned", "barlow"), ("learned", "cca")]
)
def test_maps_optimised_with_the_guard_keep_their_spread_and_rank(teacher_maps, kind):
    (std0, _), (std, erank), teacher_std = _optimise_maps(teacher_maps, kind, standardize=True)
    assert std > 0.5 * std0 and teacher_std > 0.5 and erank > 6, (std0, std, erank, teacher_std)  # of 8 dimensions


def test_maps_optimised_without_the_guard_collapse():
    """Learned teacher maps, mse, no standardisation: both sides shrink to a point."""
    (std0, erank0), (std, _), teacher_std = _optimise_maps("learned", "mse", standardize=False)
    assert std0 > 0.5 and erank0 > 6
    assert std < 1e-2 * std0 and teacher_std < 1e-2, (std0, std, teacher_std)


@pytest.mark.parametrize("kind", ["barlow", "cca"])
def test_dimensional_collapse_of_both_sides_is_cheap_unwhitened_and_costs_its_lost_rank_whitened(kind):
    """Issue 26, at Z 32 and the default lambda 0.005: both sides with every dimension on one
    shared direction score lambda (Z - 1) (barlow) / 2 lambda (Z - 1) (cca) unwhitened, below an
    honest Z whose every dimension correlates 0.3 with the target's; whitened, a collapse to rank
    r scores >= ((Z - r) / Z)^2 (barlow) / (Z - r) / Z (cca), above the honest Z."""
    g = torch.Generator().manual_seed(0)
    z_dim, lam, n = 32, 0.005, 4096
    mask = torch.ones(8, n // 8, dtype=torch.bool)
    mask[:, -7:] = False

    def honest() -> tuple[
        torch.Tensor, torch.Tensor
    ]:  # per dimension an own shared factor, correlation 0.3 between sides
        shared = torch.randn(8, n // 8, 1, z_dim, generator=g)
        side = [0.3**0.5 * shared + 0.7**0.5 * torch.randn(shared.shape, generator=g) for _ in range(2)]
        return side[0], side[1]

    def collapsed(
        rank: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # both sides: Z dimensions on `rank` shared directions
        a, _ = honest()
        a = a[..., :rank] @ torch.randn(rank, z_dim, generator=g)
        return a, a.clone()

    def score(sides: tuple[torch.Tensor, torch.Tensor], whiten: bool) -> float:
        return z_loss(standardize(sides[0], mask), standardize(sides[1], mask), mask, kind, lam, whiten)[0].item()

    fair = {w: score(honest(), w) for w in (False, True)}
    cheap = score(collapsed(1), whiten=False)
    assert cheap == pytest.approx((1 if kind == "barlow" else 2) * lam * (z_dim - 1), rel=1e-3), cheap  # 0.155 / 0.31
    assert cheap < 0.5 * fair[False], (cheap, fair)  # the old guard: collapsing pays
    for rank in (1, 4, 16):
        bound = (z_dim - rank) / z_dim
        cost = score(collapsed(rank), whiten=True)
        assert cost >= (bound**2 if kind == "barlow" else bound) - 1e-3, (rank, cost)
        assert rank == 16 or cost > fair[True], (rank, cost, fair)  # the guard: collapsing never pays
    assert fair[True] < (0.55 if kind == "barlow" else 0.75), fair  # the honest Z: (1 - 0.3)^2 / 1 - 0.3 plus noise


def _shared_kv(batches: int, seed: int = 1):
    """K/V of a student (width 16) and a teacher (width 24) over 2 layers that share 16 latent
    factors of strengths 2 .. 0.25 (fixed per-layer mixings, unit noise per channel), a fresh
    [8, 64] batch per step: a few strong shared directions and many weak ones."""
    g = torch.Generator().manual_seed(seed)
    mix = {w: torch.randn(2, 16, 2 * w, generator=g) / 4 for w in (16, 24)}
    strength = torch.linspace(2.0, 0.25, 16)

    def kv(width: int, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.einsum("btlf,lfd->btld", factors, mix[width]) + torch.randn(8, 64, 2, 2 * width, generator=g)
        return x[..., :width], x[..., width:]

    for _ in range(batches):
        factors = torch.randn(8, 64, 2, 16, generator=g) * strength
        yield kv(16, factors), {"t": kv(24, factors)}


def _optimise_shared(kind: str, whiten: bool, steps: int = 150) -> tuple[float, float, float, float]:
    """Adam on learned teacher and student maps (no student model) over `_shared_kv`; the
    student's z_erank at init, and at the end the student's z_erank, the teacher's and its z_std."""
    torch.manual_seed(0)
    zspace = _zspace({"t": 24}, 16, 8, z_loss=kind, z_teacher_maps="learned", kv_norm="none", whiten=whiten)
    mask = torch.ones(8, 64, dtype=torch.bool)
    mask[:, 60:] = False
    opt = torch.optim.Adam(zspace.parameters(), lr=1e-2)
    batches = _shared_kv(steps + 1)
    first = None
    for student, teachers in itertools.islice(batches, steps):
        out = zspace(student, teachers, mask)
        first = first or out.erank.item()
        opt.zero_grad()
        out.per_layer.mean().backward()
        opt.step()
    with torch.no_grad():  # a fresh batch of the same factors and mixings
        student, teachers = next(batches)
        out = zspace(student, teachers, mask)
        teacher_std, teacher_erank = collapse_stats(zspace.embed(teachers["t"], mask, "t"), mask)
    return first, out.erank.item(), teacher_erank.item(), teacher_std.item()


@pytest.mark.parametrize("kind", ["barlow", "cca"])
def test_learned_maps_on_shared_factors_collapse_to_a_few_directions_unwhitened_and_keep_their_rank_whitened(kind):
    """Issue 26: with learned teacher maps and shared factors, the unwhitened objective drives
    both sides' 8 Z dimensions onto ~4 directions (effective rank ~7.4 at init); the whitened one
    (the default for learned maps) keeps them near 8."""
    erank0, erank, teacher_erank, _ = _optimise_shared(kind, whiten=False)
    assert erank0 > 7 and erank < 5 and teacher_erank < 5, (erank0, erank, teacher_erank)
    erank0, erank, teacher_erank, teacher_std = _optimise_shared(kind, whiten=True)
    assert erank0 > 7 and erank > 0.8 * 8 and teacher_erank > 0.8 * 8 and teacher_std > 0.5, (
        erank0,
        erank,
        teacher_erank,
        teacher_std,
    )
    assert _zspace({"t": 24}, 16, 8, z_loss=kind, z_teacher_maps="learned").whiten  # the default for learned maps
    assert not _zspace({"t": 24}, 16, 8, z_loss=kind).whiten  # fixed maps keep the plain loss


def test_train_config_refuses_z_space_where_it_cannot_serve_or_guard():
    base = dict(store="s", student={"name_or_path": "x"}, out="o", z_dim=16)
    TrainConfig.from_dict(base)  # fixed maps, mse: fine
    TrainConfig.from_dict({**base, "z_teacher_maps": "learned", "z_loss": "barlow"})
    for bad, said in [
        ({"z_teacher_maps": "learned"}, "both sides could collapse"),
        ({"z_teacher_maps": "learned", "z_loss": "cosine"}, "both sides could collapse"),
        ({"kv_weight": 0.0}, "needs kv_weight > 0"),
        ({"adapter": "headwise"}, "adapter flat"),
        ({"mode": "latent", "adapter": "flat"}, "apply to mode 'cot' only"),
        ({"z_dim": -1}, "z_dim"),
    ]:
        with pytest.raises(ConfigError, match=said):
            TrainConfig.from_dict({**base, **bad})


def test_training_in_z_space_logs_finite_z_terms_saves_maps_and_sample_and_the_report_draws_it(tiny_store, tmp_path):
    run = tmp_path / "z"
    cfg = TrainConfig(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(run),
        batch_size=8,
        max_steps=20,
        warmup_steps=2,
        log_every=1,
        device="cpu",
        shuffle_buffer=16,
        fusion="similarity",
        z_dim=16,
        z_loss="cca",
    )
    summary = train(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert len(rows) == 20 and all("kv_k" not in r for r in rows)
    for term in ("z", "z_std", "z_erank", "cka", "route_z_teacher-a"):
        assert all(math.isfinite(r[term]) for r in rows), term
    assert all(len(r["z_layers"]) == 2 and r["z_erank"] > 4 for r in rows)  # of 16 dimensions: not collapsed
    z = np.array([r["z"] for r in rows])
    assert z[-5:].mean() < z[:5].mean(), z
    assert summary["last_z"] == rows[-1]["z"]
    final = run / "final"
    maps = torch.load(final / "zspace.pt")
    assert maps["teachers"] == list(WIDTHS)
    assert maps["student_map.weight"].shape == (2, 64, 16) and maps["teacher_maps.0.weight"].shape == (2, 128, 16)
    with np.load(final / ZSPACE_SAMPLE) as sample:
        assert list(sample["sources"]) == ["teacher-a", "teacher-b", "fused target", "student"]
        assert sample["z"].shape[0] == 4 and 0 < sample["z"].shape[1] <= 512 and sample["z"].shape[2:] == (2, 16)
        assert np.isfinite(sample["z"]).all()
    page = run_report(run)
    section = page.split("<h2>Z space</h2>")[1].split("<h2>")[0]
    assert 'src="data:image/png;base64,' in section and "fused target" in section and "effective rank" in section
    (final / ZSPACE_SAMPLE).unlink()
    assert "the Z sample is written with final/" in run_report(run)


def test_the_report_says_z_space_off_for_a_run_without_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "ce": 2.0, "loss": 2.0}) + "\n")
    section = run_report(tmp_path).split("<h2>Z space</h2>")[1].split("<h2>")[0]
    assert "Z space off" in section and "<img" not in section
