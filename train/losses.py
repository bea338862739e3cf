"""Loss components, each a pure function of tensors and masks (testable alone).

Shapes: logits [B, T, V]; input_ids, masks [B, T]; K/V [B, T, L, D]; attention [B, H, T, T]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "masked_ce",
    "rows_ce",
    "layer_std_norm",
    "masked_kv_loss",
    "debiased_cka",
    "masked_cka_loss",
    "cka_sums",
    "cka_from_sums",
    "layer_moments",
    "moment_std",
    "standardize",
    "attention_key_weights",
    "warmup_mix",
    "layer_anneal_weights",
    "attention_log_probs",
    "attention_kl",
    "linear_ramp",
    "topk_kl",
]


def masked_ce(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token CE on positions whose *target* token is in loss_mask (reasoning + answer)."""
    return rows_ce(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def rows_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of logits [B, T, V] against targets [B, T] over the positions where mask [B, T] is
    set, computed on those rows only: a prompt or a pad costs no softmax over the vocabulary, and
    nothing there (not even NaN) reaches the loss. (cross_entropy over the transposed [B, V, T]
    at every position made a CPU step 1.44x slower at a 49k vocabulary: bench/ce.py.)
    mask None: logits [N, V] and targets [N] are those rows already; the mean is over all N."""
    if mask is not None:
        keep = mask.bool()
        logits, targets = logits[keep], targets[keep]
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(len(targets), 1)


def layer_std_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each layer of x [B, T, L, D] by its mean and std over valid positions and
    channels. Makes the KV loss scale-free per layer, so a trainable adapter cannot shrink its
    way to a small loss and deep layers with large activations do not dominate."""
    m = mask[:, :, None, None]  # [B, T, 1, 1]
    n = m.sum() * x.shape[-1]
    xm = torch.where(m, x, 0.0)  # padded positions cannot leak into the statistics, even as NaN
    mean = xm.sum(dim=(0, 1, 3), keepdim=True) / n  # [1, 1, L, 1]
    var = torch.where(m, (x - mean) ** 2, 0.0).sum(dim=(0, 1, 3), keepdim=True) / n
    return (x - mean) / (var + eps).sqrt()


def masked_kv_loss(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, kind: str = "mse", weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A K or V loss over valid positions of a, b [B, T, L, D]; padded positions contribute
    exactly nothing (selected away, so even NaN there cannot leak in).
    kind: "mse" | "smooth_l1" (Huber, beta 1) | "cosine" (1 - cosine similarity per token).
    weights [B, T, L] (optional): per-token, per-layer weights with mean 1 over real tokens
    (see `attention_key_weights`); the loss of a layer is then mean(weight * per-token loss).
    Returns (scalar loss, per-layer loss [L])."""
    if kind not in ("mse", "smooth_l1", "cosine"):
        raise ValueError(f"unknown KV loss {kind!r}; choose mse, smooth_l1 or cosine")
    a, b = a[mask], b[mask]  # [N, L, D] real tokens only
    if not len(a):
        per_layer = a.new_zeros(a.shape[1])
    elif weights is None:
        if kind == "mse":
            per_layer = ((a - b) ** 2).mean(dim=(0, 2))
        elif kind == "smooth_l1":
            per_layer = F.smooth_l1_loss(a, b, reduction="none").mean(dim=(0, 2))
        else:
            per_layer = (1 - F.cosine_similarity(a, b, dim=-1)).mean(dim=0)
    else:
        if kind == "mse":
            per_token = ((a - b) ** 2).mean(dim=2)  # [N, L]
        elif kind == "smooth_l1":
            per_token = F.smooth_l1_loss(a, b, reduction="none").mean(dim=2)
        else:
            per_token = 1 - F.cosine_similarity(a, b, dim=-1)
        per_layer = (weights[mask] * per_token).mean(dim=0)
    return per_layer.mean(), per_layer


def _hsic_terms(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x - x.mean(dim=0)  # [N, D]; the unbiased HSIC is translation invariant, centring avoids cancellation
    sq = (x * x).sum(dim=1)  # [N] = diag(K)
    colsum = x.sum(dim=0)  # [D]
    k1 = x @ colsum - sq  # [N] = K~ 1
    sum_k = colsum @ colsum - sq.sum()  # 1^T K~ 1
    return x, sq, k1, sum_k


def _hsic_u(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    (xa, sqa, k1a, sa), (xb, sqb, k1b, sb) = a, b
    n = xa.shape[0]
    cross = xa.T @ xb  # [D1, D2]
    tr_kl = (cross * cross).sum() - (sqa * sqb).sum()
    return (tr_kl + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1a @ k1b)) / (n * (n - 3))


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Debiased linear CKA of x [N, D1] and y [N, D2], differentiable (align.cka.linear_cka
    detaches and returns a float). Same estimator, in feature space and float64: unbiased HSIC
    (Song et al. 2012), HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y)). Needs N >= 4. Returns a 0-d
    tensor in x's dtype."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"debiased_cka needs x [N, D1] and y [N, D2] over the same tokens, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 real tokens, got {x.shape[0]}; use a larger batch")
    a, b = _hsic_terms(x.double()), _hsic_terms(y.double())
    return (_hsic_u(a, b) / (_hsic_u(a, a) * _hsic_u(b, b)).sqrt()).to(x.dtype)


def masked_cka_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """mean over `layers` of 1 - debiased_cka(a[:, :, l], b[:, :, l]) over the real tokens of
    a, b [B, T, L, D] (padded positions selected away). Every real token of the batch is one
    row: CKA compares how the two sides arrange the same tokens, whatever their widths."""
    # One layer at a time: gathering [N, L, D] would copy (and in backward scatter) every layer.
    return torch.stack([1 - debiased_cka(a[:, :, i][mask], b[:, :, i][mask]) for i in layers]).mean()  # [N, D] each


def cka_sums(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What debiased linear CKA of x [N, D1] and y [N, D2] needs, as sums over the N rows
    (float64): the sums of any split of the rows add up to those of all of them, so
    `cka_from_sums` of a window's summed statistics (every micro-batch and rank) is the CKA of
    the whole window, and its gradient flows back through each part's sums."""
    x, y = x.double(), y.double()
    sx, sy = (x * x).sum(dim=1), (y * y).sum(dim=1)  # [N] = diag of the Gram matrices
    return {
        "n": x.new_tensor(float(len(x))),
        "cx": x.sum(0),
        "cy": y.sum(0),
        "xx": x.T @ x,
        "yy": y.T @ y,
        "xy": x.T @ y,
        "sx": sx.sum(),
        "sy": sy.sum(),
        "sxx": (sx * sx).sum(),
        "syy": (sy * sy).sum(),
        "sxy": (sx * sy).sum(),
        "sx_x": sx @ x,
        "sy_y": sy @ y,
        "sy_x": sy @ x,
        "sx_y": sx @ y,
    }


def _hsic_from_sums(n, ca, cb, ab, sa, sb, sab, sb_a, sa_b) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of rows a, b from their sums: ab = A^T B, sa = sum of
    |a_i|^2, sab = sum of |a_i|^2 |b_i|^2, sb_a = sum of |b_i|^2 a_i, sa_b = sum of |a_i|^2 b_i."""
    tr_kl = (ab * ab).sum() - sab  # tr(K~ L~), K~ = A A^T with a zero diagonal
    sum_k, sum_l = ca @ ca - sa, cb @ cb - sb  # 1^T K~ 1, 1^T L~ 1
    # 1^T K~ L~ 1 = sum_i (a_i.ca - |a_i|^2)(b_i.cb - |b_i|^2)
    k1l1 = ca @ ab @ cb - ca @ sb_a - cb @ sa_b + sab
    return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * k1l1) / (n * (n - 3))


def cka_from_sums(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """Debiased linear CKA from `cka_sums` (summed over any number of parts): equals
    `debiased_cka` of all the rows at once. Needs n >= 4."""
    n = s["n"]
    if float(n.detach()) < 4:
        raise ValueError(f"debiased CKA needs at least 4 real tokens, got {int(n)}; use a larger batch")
    xy = _hsic_from_sums(n, s["cx"], s["cy"], s["xy"], s["sx"], s["sy"], s["sxy"], s["sy_x"], s["sx_y"])
    xx = _hsic_from_sums(n, s["cx"], s["cx"], s["xx"], s["sx"], s["sx"], s["sxx"], s["sx_x"], s["sx_x"])
    yy = _hsic_from_sums(n, s["cy"], s["cy"], s["yy"], s["sy"], s["sy"], s["syy"], s["sy_y"], s["sy_y"])
    return xy / (xx * yy).sqrt()


def layer_moments(x: torch.Tensor) -> torch.Tensor:
    """[3, L] per layer of x [N, L, D] (real tokens only): the sum, the sum of squares and the
    count of its values (sums: any split of a batch adds up to the whole)."""
    return torch.stack(
        [x.sum(dim=(0, 2)), (x * x).sum(dim=(0, 2)), x.new_full((x.shape[1],), float(x.shape[0] * x.shape[2]))]
    )


def moment_std(moments: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [L] from `layer_moments` [3, L]: population variance + eps, as layer_std_norm."""
    n = moments[2].clamp_min(1)
    mean = moments[0] / n
    return mean, ((moments[1] / n - mean * mean).clamp_min(0) + eps).sqrt()


def standardize(x: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """x [B, T, L, D] standardised per layer by fixed statistics: `moments` [3, L] as
    `layer_moments` sums (of the previous optimizer step's window, over every rank)."""
    mean, std = moment_std(moments)
    return (x - mean.to(x.dtype)[:, None]) / std.to(x.dtype)[:, None]


def attention_key_weights(
    attentions: list[torch.Tensor] | tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    """Per-token, per-layer weights [B, T, L] from the student's attention probabilities
    (one [B, H, T_q, T_k] per layer): the attention mass each key position receives, averaged
    over heads and over the sample's real queries, then divided by its mean over the sample's
    real tokens (mean 1 per sample, hence over the batch). Padded queries and keys get weight 0
    and cannot leak in, even as NaN. Detached: the weights pick what to match, they are not
    trained."""
    with torch.no_grad():
        q = mask[:, None, :, None]  # [B, 1, T_q, 1]
        n = mask.sum(dim=1, keepdim=True)  # [B, 1]
        out = []
        for p in attentions:
            mass = torch.where(q, p.float(), 0.0).sum(dim=(1, 2)) / (p.shape[1] * n)  # [B, T_k]
            mass = torch.where(mask, mass, 0.0)
            out.append(mass / (mass.sum(dim=1, keepdim=True) / n))
        return torch.stack(out, dim=2)  # [B, T, L]


def warmup_mix(weights: torch.Tensor, step: int | None, warmup_steps: int) -> torch.Tensor:
    """Linear warm-up from uniform weights (1 everywhere) at step 0 to `weights` at
    step >= warmup_steps: 1 + min(step / warmup_steps, 1) * (weights - 1). step None or
    warmup_steps 0: `weights` as they are."""
    if step is None or warmup_steps <= 0 or step >= warmup_steps:
        return weights
    return 1 + (step / warmup_steps) * (weights - 1)


def layer_anneal_weights(num_layers: int, step: int | None, anneal_steps: int) -> torch.Tensor:
    """Per-layer weights [L] of the KV loss: shallow layers first. Layer 0 has weight 1 from
    the start; layer l >= 1 ramps linearly from 0 at step (l - 1) * S / (L - 1) to 1 at step
    l * S / (L - 1), S = anneal_steps, i.e. a_l(step) = clamp(step * (L - 1) / S - l + 1, 0, 1).
    Every layer has weight 1 from step S on (and when S is 0 or step is None)."""
    if step is None or anneal_steps <= 0 or num_layers == 1:
        return torch.ones(num_layers)
    layers = torch.arange(num_layers, dtype=torch.float64)
    return (step * (num_layers - 1) / anneal_steps - layers + 1).clamp(0, 1).float()


def attention_log_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scaling: float, sliding_window: int | None = None
) -> torch.Tensor:
    """log softmax(q k^T * scaling + causal / padding mask), as eager attention computes its
    probabilities: q [B, H_q, T, d] and k [B, H_kv, T, d] post-RoPE (query head h reads kv head
    h // (H_q / H_kv), the GQA grouping), mask [B, T] real tokens. Returns [B, H_kv, G, T_q, T_k],
    G = H_q / H_kv (reshape to [B, H_q, T, T] for the eager layout). A key is visible to query i
    when it is real, not after i, and (sliding_window w) later than i - w; masked keys get the
    dtype's minimum rather than -inf, so a query row with no visible key is uniform, not NaN."""
    B, H_q, T, d = q.shape
    H_kv = k.shape[1]
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q.view(B, H_kv, H_q // H_kv, T, d), k) * scaling
    i = torch.arange(T, device=q.device)
    visible = i[None, :] <= i[:, None]  # [T_q, T_k] causal
    if sliding_window is not None:
        visible = visible & (i[None, :] > i[:, None] - sliding_window)
    visible = visible & mask[:, None, None, None, :]  # [B, 1, 1, T_q, T_k]
    return torch.log_softmax(logits.masked_fill(~visible, torch.finfo(logits.dtype).min), dim=-1)


def attention_kl(
    q: torch.Tensor,
    k_s: torch.Tensor,
    k_t: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Per query token KL(A_t || A_s), A_s the attention of queries q over the student's keys
    k_s, A_t that of the same queries over target keys k_t (all post-RoPE, shapes as in
    `attention_log_probs`), averaged over query heads: [B, T], 0 at padded queries. A_t is the
    target distribution and detached: the student moves its own attention towards it, and
    cannot lower the term by reshaping the target (e.g. queries shrinking both to uniform).
    Padded keys and queries contribute nothing, even as NaN; equal keys give exactly 0."""
    log_s = attention_log_probs(q.float(), k_s.float(), mask, scaling, sliding_window)
    with torch.no_grad():
        log_t = attention_log_probs(q.float(), k_t.float(), mask, scaling, sliding_window)
        p_t = log_t.exp()  # masked keys: exactly 0
    kl = (p_t * (log_t - log_s)).sum(dim=-1).mean(dim=(1, 2))  # [B, T_q]
    return torch.where(mask, kl, 0.0)


def attention_target_keys(
    k_s: torch.Tensor, adapted: torch.Tensor, w: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The keys the attention-KL target A_t reads, [B, T, L, D] float, with a fixed temperature:
    each teacher's adapted keys adapted [N, B, T, L, D] centred and scaled per sample and layer
    onto the student's keys k_s [B, T, L, D] on the same tokens (mean and std over the sample's
    real tokens and channels), a_n -> mu_s + (a_n - mu_n) * std_s / std_n, then fused with the
    weights w (broadcast to [N, B, T, L]; summing to 1 over teachers). So A_t is the attention
    over the layer_std KV target put back into the student's key frame: blind to each adapter's
    scale and to any shift of its output by a constant per layer, which the layer_std KV loss
    cannot see and so does not hold (issue 26), and equal to the plain fusion when the adapted
    keys already have the student's mean and std (the student's own keys: k_s, up to rounding). No eps
    (unlike layer_std_norm): the ratio is exactly scale-free. Per sample: A_t of a sample does
    not depend on what it is batched with. Padded positions stay out of the statistics (even NaN).
    Detached (no_grad): a target."""
    with torch.no_grad():
        m = mask[:, :, None, None]  # [B, T, 1, 1]
        n = (m.sum(dim=1, keepdim=True) * k_s.shape[-1]).clamp_min(1)  # [B, 1, 1, 1]

        def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # per sample and layer: [..., B, 1, L, 1]
            mean = torch.where(m, x, 0.0).sum(dim=(-3, -1), keepdim=True) / n
            return mean, (torch.where(m, (x - mean) ** 2, 0.0).sum(dim=(-3, -1), keepdim=True) / n).sqrt()

        mu_s, sd_s = moments(k_s.float())
        a = adapted.float()
        mu_t, sd_t = moments(a)
        return mu_s + (w.float()[..., None] * (a - mu_t) * (sd_s / sd_t.clamp_min(1e-12))).sum(0)


def linear_ramp(step: int | None, ramp_steps: int) -> float:
    """A loss weight's factor: 0 at step 0 rising linearly to 1 at step >= ramp_steps; 1 when
    ramp_steps is 0 or step is None (every schedule complete)."""
    if step is None or ramp_steps <= 0:
        return 1.0
    return min(step / ramp_steps, 1.0)


def topk_kl(
    student_logits: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL(teacher || student) on the teacher's stored top-K tokens, per position: the
    offline top-k logits loss (DistillKit's offline formulation, Megatron-Core's offline logits).

    student_logits [N, V]; ids [N, K] vocabulary ids (the store's logits_ids); lp [N, K] the
    teacher's log-probs there (logits_lp). With T = temperature:
        p = softmax(lp / T) over the K tokens (renormalised: the K stored tokens are its support),
        log q = log_softmax(student_logits / T) over the full vocabulary, gathered at ids,
        loss [N] = T^2 * sum_k p_k (log p_k - log q_k)    (T^2 keeps gradients comparable across T).
    The teacher is a constant: no gradient reaches lp.

    What it omits: the teacher's tail mass outside its top K (1 - sum exp(lp), dropped by the
    renormalisation) and so any pull on the student's mass there; q is not renormalised, so mass
    the student puts outside the support still costs it (log q_k is smaller). It equals the full
    KL when K = V, and is 0 when the student's distribution over the support equals the teacher's
    renormalised one and puts no mass outside it."""
    T = float(temperature)
    if T <= 0:
        raise ValueError(f"topk_kl: temperature must be > 0, got {temperature}")
    log_p = torch.log_softmax(lp.detach().float() / T, dim=-1)  # [N, K]
    log_q = torch.log_softmax(student_logits.float() / T, dim=-1).gather(-1, ids.long())  # [N, K]
    return T * T * (log_p.exp() * (log_p - log_q)).sum(-1)
