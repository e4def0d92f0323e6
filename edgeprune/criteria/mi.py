"""Mutual-information criterion (DESIGN.md §5.1): matrix-based Rényi α-entropy on FFN activations.

Estimator: neuron k's activations on n sampled token positions (input of the FFN output
projection, after the nonlinearity; SwiGLU act(gate)*up) give a Gaussian Gram matrix
K_k, A_k = K_k / tr(K_k); S_α(A) = log2(Σ λ^α) / (1-α); joint entropy from the Hadamard
product; I(k;l) = S(A_k) + S(A_l) - S(A_k, A_l). α = 2 needs no eigenvalues (Σλ² = ‖A‖_F²):
every pair of a layer is one matrix product of the squared Gram entries (upper triangle
only, chunked over position pairs). Any other α (default 1.01) runs the exact path,
batched `torch.linalg.eigvalsh`, meant for small layers and for checking the fast path.

Why not plain redundancy (../shared/notes/CRITERIA.md): with a kernel width per neuron the
estimate is scale-invariant and blind to how much a neuron contributes to the output; it
lost to random. Here activations are contribution-scaled (a_k·‖w_k‖, w_k = down-projection
column) and one kernel width serves a whole layer, so information is measured in the
units the next layer sees. Selections (option `selection`; scores are higher = keep, and
for the elimination forms the reverse elimination order, so one scoring serves every width):
- `mrmr` (default): greedy elimination, drop the neuron with the lowest entropy minus
  `redundancy_weight` × its mean MI with the neurons still kept (max-relevance, min-redundancy;
  entropy and MI come from the same Gram matrices, one matrix product per layer at α = 2).
- `entropy`: S_α of the contribution-scaled activation (no pairs; the exact path's use).
- `output-info`: bits of the layer's FFN output y = Σ_k a_k w_k lost when neuron k is removed,
  S(y) - I(y; y - a_k w_k) = S(y | y - a_k w_k), one kernel width for y.
- `conditional`: the same, conditioned on what stays: only the residual r_k of a_k given the other
  neurons (least squares over all calibration tokens) is lost once the layer is re-fit
  (edgeprune.compensate), so S(y | y - r_k w_k); redundancy means "can be rebuilt from what stays".
  In the Gaussian case this ranks like OBS's ‖w_k‖²·Var(r_k).
- `redundancy`: drop a member of the most redundant kept pair; `member` = `entropy` (lower
  information goes) or `contribution` (lower E[a²]·‖w‖² goes).
- `paper`: random kept pairs, one member dropped when I > the `threshold` quantile of the
  layer's MI; `seeds` runs, keeping the one whose pruned model (at `kl_sparsity`) has the
  lowest KL divergence of next-token distributions to the dense model on held-out
  calibration sequences (the last quarter of the batch, not used for statistics).
`clusters` > 1 restricts pairs to k-means clusters of the normalized activations (scale).
Kernel widths (`width_rule`): `silverman` γ·std·n^(-1/5), `median` γ·median pairwise
distance, `fixed` γ; `width_scope` `layer` (one width, median over neurons) or `neuron`.
Defaults (median rule, layer scope, γ = 64, mrmr with weight 1, n = 4096 positions, i.e. every
position of `run`'s 32 windows of 128, of which 32,640 random pairs enter the Gram sums, `max_pairs`)
were chosen on SmolLM2-135M (benchmarks/RESULTS.md): at γ = 1 the kernel saturates for high-spread
neurons (PPL 84.7 at CRITERIA.md's cut); at γ ≥ 16 the α = 2 entropy ranks like Var(a)·‖w‖²
(fluctuation's ordering, which it approaches as γ grows); more positions cut the sampling noise
(256 → 1024: 76.8 → 73.5 there). Under the least-squares re-fit that `prune` and `run` apply after
every cut (LLM-Pruner's 20% cut), γ = 16 on 1024 positions was 6.7% behind fluctuation, on 4096
positions 4.7%, γ = 64 on 4096 1.2% (γ = 256: 1.6%); the redundancy term changes nothing there
(weights 0 / 1 / 4 within 0.3%) or without the re-fit (73.49 vs 73.44); per-neuron widths are near random.

Heads: `mi` scores heads with the same estimator: S_2 of each head's contribution to the
attention output (its slice of the o_proj input times its o_proj columns), one median-rule
width × γ per layer, i.e. the heads' counterpart of the FFN entropy term (no pair term: a
layer has only a few heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.criteria.activations import collect_channel_stats
from edgeprune.criteria.base import GroupScores, ScoringInputs, register
from edgeprune.errors import EdgepruneError
from edgeprune.models import FamilyAdapter

MI_SELECTIONS = ("mrmr", "entropy", "output-info", "conditional", "redundancy", "paper")
WIDTH_RULES = ("silverman", "median", "fixed")
WIDTH_SCOPES = ("layer", "neuron")
SCALES = ("contribution", "none")
MEMBERS = ("entropy", "contribution")
PAIR_CHUNK = 4096  # position pairs per matrix-product chunk: bounds memory at PAIR_CHUNK × neurons floats
EXACT_PAIR_LIMIT = 20_000  # eigendecompositions the exact path may spend on pairwise MI in one layer


@dataclass(frozen=True)
class MIOptions:
    """Options of `mi` (keys of `ScoringInputs.options`); defaults chosen by benchmarks/bench_mi.py."""

    selection: str = "mrmr"
    alpha: float = 2.0
    width_rule: str = "median"
    width_scope: str = "layer"
    gamma: float = 64.0
    scale: str = "contribution"
    n_positions: int = 4096
    member: str = "entropy"
    redundancy_weight: float = 1.0
    clusters: int = 1
    seeds: int = 4
    threshold: float = 0.9
    kl_sparsity: float = 0.25
    max_pairs: int = 32640  # position pairs per layer (as many as 256 positions have); more are subsampled

    def __post_init__(self) -> None:
        for name, allowed in (
            ("selection", MI_SELECTIONS),
            ("width_rule", WIDTH_RULES),
            ("width_scope", WIDTH_SCOPES),
            ("scale", SCALES),
            ("member", MEMBERS),
        ):
            if getattr(self, name) not in allowed:
                raise EdgepruneError(f"mi option {name}={getattr(self, name)!r} is unknown: use one of {allowed}")
        if min(self.alpha, self.gamma) <= 0 or self.n_positions < 4 or min(self.clusters, self.seeds) < 1:
            raise EdgepruneError("mi options need alpha > 0, gamma > 0, n_positions >= 4, clusters >= 1, seeds >= 1")
        if self.max_pairs < 0:
            raise EdgepruneError("mi option max_pairs must be >= 0 (0: every pair of positions)")
        if not (0 < self.threshold < 1 and 0 < self.kl_sparsity < 1):
            raise EdgepruneError("mi options threshold and kl_sparsity are fractions in (0, 1)")

    @property
    def needs_pairs(self) -> bool:
        return self.selection in ("mrmr", "redundancy", "paper")


# -- kernel widths ------------------------------------------------------------------------


def upper_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the strict upper triangle of an n×n matrix."""
    iu = torch.triu_indices(n, n, 1)
    return iu[0], iu[1]


PairSample = tuple[torch.Tensor, torch.Tensor, float]


def position_pairs(n: int, max_pairs: int = 0, gen: torch.Generator | None = None) -> PairSample:
    """Upper-triangle position pairs (i, j) and the factor from their sums to the full triangle's.

    With more than `max_pairs` pairs a seeded random subset stands in for all of them: the Gram sums
    are then unbiased estimates, so more positions fit the same cost (lower sampling noise).
    """
    iu, ju = upper_pairs(n)
    total = len(iu)
    if max_pairs and total > max_pairs:
        pick = torch.randperm(total, generator=gen)[:max_pairs].sort().values
        iu, ju = iu[pick], ju[pick]
    return iu, ju, total / len(iu)


def kernel_widths(z: torch.Tensor, rule: str, scope: str, gamma: float) -> torch.Tensor:
    """Gaussian kernel width per column of z [n, m]; `layer` scope gives every column the median width."""
    n = z.shape[0]
    if rule == "fixed":
        spread = torch.ones(z.shape[1], dtype=z.dtype)
    elif rule == "silverman":
        spread = z.std(0) * n ** (-0.2)
    else:
        iu, ju = upper_pairs(n)
        step = max(1, len(iu) // 4096)  # a fixed subset of pairs is plenty for a median
        spread = (z[iu[::step]] - z[ju[::step]]).abs().median(0).values
    if scope == "layer":
        spread = spread.median().expand(z.shape[1])
    return (gamma * spread).clamp_min(torch.finfo(z.dtype).tiny)


def vector_width(distances_sq: torch.Tensor, rule: str, gamma: float, n: int, dim: int) -> float:
    """One width for vector-valued samples from their squared pairwise distances (upper triangle)."""
    if rule == "fixed":
        spread = 1.0
    elif rule == "silverman":  # per-dimension std behind the mean squared distance, d-dim Silverman exponent
        spread = math.sqrt(distances_sq.mean().item() / 2) * n ** (-1 / (dim + 4))
    else:
        spread = distances_sq.median().sqrt().item()
    return max(gamma * spread, 1e-30)


# -- α = 2 fast path ----------------------------------------------------------------------


def renyi2_sums(
    z: torch.Tensor, sigma: torch.Tensor, pairs: bool, sample: PairSample | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upper-triangle sums of squared Gram entries: s_k = Σ_{i<j} K_k[i,j]², G_kl = Σ_{i<j} K_k² K_l².

    K has unit diagonal and is symmetric, so Σ_ij K_k² = n + 2 s_k and Σ_ij K_k² K_l² = n + 2 G_kl:
    the upper triangle holds everything. G is accumulated over chunks of position pairs.
    """
    iu, ju, scale = sample or position_pairs(z.shape[0])
    m = z.shape[1]
    s = torch.zeros(m, dtype=z.dtype)
    g = torch.zeros(m, m, dtype=z.dtype) if pairs else None
    for start in range(0, len(iu), PAIR_CHUNK):
        sl = slice(start, start + PAIR_CHUNK)
        q = (z[iu[sl]] - z[ju[sl]]).div_(sigma).square_().neg_().exp_()  # K² = exp(-d²/σ²) for K = exp(-d²/2σ²)
        s += q.sum(0)
        if g is not None:
            g.addmm_(q.T, q)
    return s * scale, (g * scale if g is not None else None)


def renyi2_entropy(s: torch.Tensor, n: int) -> torch.Tensor:
    """S_2(A) = -log2 ‖A‖_F² with A = K/n and ‖K‖_F² = n + 2s."""
    return -torch.log2((n + 2 * s) / n**2)


def renyi2_mi(g: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor, n: int) -> torch.Tensor:
    """I_2 = log2(n² · (n + 2g) / ((n + 2s_a)(n + 2s_b))): DESIGN.md §5.1's identity on upper sums."""
    return torch.log2(n**2 * (n + 2 * g) / ((n + 2 * s_a) * (n + 2 * s_b)))


# -- exact path (any α) ---------------------------------------------------------------------


def gram(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian Gram matrices [m, n, n] of the columns of z [n, m]."""
    d = (z.T[:, :, None] - z.T[:, None, :]) / sigma[:, None, None]
    return torch.exp(-0.5 * d.square())


def renyi_entropy(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """S_α of trace-one PSD matrices [..., n, n] from their eigenvalues (α = 1: von Neumann)."""
    lam = torch.linalg.eigvalsh(a).clamp_min(0)
    if abs(alpha - 1) < 1e-12:
        return -(lam * torch.log2(lam.clamp_min(1e-300))).sum(-1)
    return torch.log2(lam.pow(alpha).sum(-1)) / (1 - alpha)


def exact_entropies(z: torch.Tensor, sigma: torch.Tensor, alpha: float, batch: int = 64) -> torch.Tensor:
    """S_α(A_k) for every column, in batches of `batch` Gram matrices."""
    n = z.shape[0]
    parts = [
        renyi_entropy(gram(z[:, c : c + batch], sigma[c : c + batch]) / n, alpha) for c in range(0, z.shape[1], batch)
    ]
    return torch.cat(parts)


def exact_mi(z: torch.Tensor, sigma: torch.Tensor, alpha: float, pairs: torch.Tensor) -> torch.Tensor:
    """I_α(k;l) for the given pairs [p, 2] of columns, joint entropy of A_k∘A_l / tr."""
    n = z.shape[0]
    ent = exact_entropies(z, sigma, alpha)
    out = torch.empty(len(pairs), dtype=z.dtype)
    for start in range(0, len(pairs), 64):
        p = pairs[start : start + 64]
        joint = gram(z[:, p[:, 0]], sigma[p[:, 0]]) * gram(z[:, p[:, 1]], sigma[p[:, 1]]) / n
        out[start : start + 64] = ent[p[:, 0]] + ent[p[:, 1]] - renyi_entropy(joint, alpha)
    return out


# -- entropies and the pairwise MI matrix of one layer --------------------------------------


def entropy_and_mi(
    z: torch.Tensor,
    sigma: torch.Tensor,
    alpha: float,
    pairs: bool,
    labels: torch.Tensor,
    sample: PairSample | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy per column and (if `pairs`) the MI matrix within clusters (-inf elsewhere and on the diagonal).

    At α = 2 one pass over the position pairs gives both (the entropies come from the same sums).
    """
    n, m = z.shape
    ent = torch.empty(m, dtype=z.dtype)
    mi = torch.full((m, m), -math.inf, dtype=z.dtype) if pairs else None
    for c in labels.unique():
        idx = torch.nonzero(labels == c).reshape(-1)
        block = (idx[:, None], idx[None, :])
        with_pairs = mi is not None and len(idx) > 1
        if alpha == 2.0:
            s, g = renyi2_sums(z[:, idx], sigma[idx], pairs=with_pairs, sample=sample)
            ent[idx] = renyi2_entropy(s, n)
            if g is not None:
                mi[block] = renyi2_mi(g, s[:, None], s[None, :], n)
        else:
            ent[idx] = exact_entropies(z[:, idx], sigma[idx], alpha)
            if with_pairs:
                mi[block] = cluster_mi(z[:, idx], sigma[idx], alpha)
    if mi is not None:
        mi.fill_diagonal_(-math.inf)
    return ent, mi


def cluster_mi(z: torch.Tensor, sigma: torch.Tensor, alpha: float) -> torch.Tensor:
    """Full MI matrix [m, m] of the columns of z (diagonal meaningless)."""
    n, m = z.shape
    if alpha == 2.0:
        s, g = renyi2_sums(z, sigma, pairs=True)
        return renyi2_mi(g, s[:, None], s[None, :], n)
    if m * (m - 1) // 2 > EXACT_PAIR_LIMIT:
        raise EdgepruneError(
            f"exact-path pairwise MI over {m} neurons needs {m * (m - 1) // 2} eigendecompositions: "
            "use alpha=2 (fast path) or more clusters"
        )
    iu, ju = upper_pairs(m)
    vals = exact_mi(z, sigma, alpha, torch.stack([iu, ju], 1))
    out = torch.zeros(m, m, dtype=z.dtype)
    out[iu, ju] = vals
    out[ju, iu] = vals
    return out


def kmeans_labels(z: torch.Tensor, k: int, gen: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Cluster the columns of z by k-means on their standardized, unit-norm profiles (seeded)."""
    m = z.shape[1]
    if k <= 1 or m <= k:
        return torch.zeros(m, dtype=torch.long)
    x = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    x = (x / x.norm(dim=0).clamp_min(1e-12)).T
    centers = x[torch.randperm(m, generator=gen)[:k]].clone()
    labels = torch.zeros(m, dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, centers).argmin(1)
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centers[c] = members.mean(0)
    return labels


# -- output information (relevance) --------------------------------------------------------


def info_lost_exact(d_y: torch.Tensor, d_without: torch.Tensor, sigma: float, alpha: float) -> torch.Tensor:
    """S_α(y | y') from full squared-distance matrices d_y [n, n] and d_without [m, n, n] (eigenvalues)."""
    n = d_y.shape[0]
    k_y = torch.exp(-d_y / (2 * sigma**2))
    k_w = torch.exp(-d_without.clamp_min(0) / (2 * sigma**2))
    return renyi_entropy(k_y * k_w / n, alpha) - renyi_entropy(k_w / n, alpha)


def ffn_output_info(
    z: torch.Tensor,
    w: torch.Tensor,
    opts: MIOptions,
    sample: PairSample | None = None,
    removed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bits of the FFN output y = z wᵀ lost when each neuron k is removed: S(y | y - r_k w_k).

    r = z (default): the neuron's whole activation goes. r = the residual of z_k given the other neurons
    (`conditional`): what is lost once the rest is re-fit, since least squares rebuilds the explained part.

    ‖Δ(y - z_k w_k)‖² = ‖Δy‖² - 2 Δz_k (Δy·w_k) + Δz_k² ‖w_k‖² on every position pair, so each
    neuron costs one elementwise pass over the pairs and one matrix-vector product (α = 2);
    other α build the n×n matrices and take eigenvalues, in batches of neurons.
    """
    n = z.shape[0]
    y = z @ w.T
    r = z if removed is None else removed
    iu, ju, scale = sample or position_pairs(n)
    dy = y[iu] - y[ju]
    d_y = dy.square().sum(1)
    sigma = vector_width(d_y, opts.width_rule, opts.gamma, n, y.shape[1])
    w_sq = w.square().sum(0)
    if opts.alpha != 2.0:
        full_y = torch.cdist(y, y).square()
        p = y @ w
        parts = []
        for c in range(0, z.shape[1], 64):
            zc, pc = r[:, c : c + 64].T, p[:, c : c + 64].T
            dz, dp = zc[:, :, None] - zc[:, None, :], pc[:, :, None] - pc[:, None, :]
            d_without = full_y - 2 * dz * dp + dz.square() * w_sq[c : c + 64, None, None]
            parts.append(info_lost_exact(full_y, d_without, sigma, opts.alpha))
        return torch.cat(parts)
    k_y = torch.exp(-d_y / sigma**2)
    p = y @ w  # Δy·w_k = p_ik - p_jk
    s_w = torch.zeros(z.shape[1], dtype=z.dtype)
    g = torch.zeros_like(s_w)
    for start in range(0, len(iu), PAIR_CHUNK):
        sl = slice(start, start + PAIR_CHUNK)
        dz = r[iu[sl]] - r[ju[sl]]
        k_w = dz.square().mul_(w_sq).addcmul_(dz, p[iu[sl]].sub_(p[ju[sl]]), value=-2).add_(d_y[sl, None])
        k_w = k_w.clamp_min_(0).mul_(-1 / sigma**2).exp_()  # in place: this loop is the criterion's cost
        s_w += k_w.sum(0)
        g += k_y[sl] @ k_w
    return torch.log2((n + 2 * scale * s_w) / (n + 2 * scale * g))


def head_entropy(
    x: torch.Tensor, w_o: torch.Tensor, n_heads: int, opts: MIOptions, sample: PairSample | None = None
) -> torch.Tensor:
    """S_2 of each head's contribution o_h = x_h w_o,hᵀ to the attention output, one kernel width per layer.

    The heads' counterpart of the FFN entropy term: ‖Δo_h‖² on every position pair, width γ × the
    median over heads of the median pairwise distance (the `median` rule, used for every rule here).
    """
    n, hd = x.shape[0], x.shape[1] // n_heads
    contrib = torch.stack([x[:, h * hd : (h + 1) * hd] @ w_o[:, h * hd : (h + 1) * hd].T for h in range(n_heads)])
    iu, ju, scale = sample or position_pairs(n)
    dist = torch.cat(
        [
            (contrib[:, iu[c : c + PAIR_CHUNK]] - contrib[:, ju[c : c + PAIR_CHUNK]]).square().sum(-1)
            for c in range(0, len(iu), PAIR_CHUNK)
        ],
        dim=1,
    )  # [heads, pairs]
    sigma = opts.gamma * dist.median(1).values.median().sqrt().clamp_min(1e-30)
    return renyi2_entropy(scale * torch.exp(-dist / sigma**2).sum(1), n)


# -- selection: elimination orders -> scores -------------------------------------------------


def order_to_scores(order: torch.Tensor) -> torch.Tensor:
    """Reverse elimination order as scores in [0, 1]: the first neuron dropped scores 0."""
    scores = torch.empty(len(order))
    scores[order] = torch.arange(len(order), dtype=torch.float32) / max(1, len(order) - 1)
    return scores


def redundancy_order(mi: torch.Tensor, keep_value: torch.Tensor) -> torch.Tensor:
    """Repeatedly take the most redundant kept pair and drop its member with the lower `keep_value`.

    Row maxima are cached and refreshed only for rows whose partner was dropped. When no kept
    pair is left to compare (e.g. singleton clusters) the lowest `keep_value` goes.
    """
    mi = mi.clone()
    m = mi.shape[0]
    alive = torch.ones(m, dtype=torch.bool)
    row_max, row_arg = mi.max(1)
    order = []
    for _ in range(m - 1):
        a = int(row_max.argmax())
        if row_max[a] == -math.inf:
            alive_idx = torch.nonzero(alive).reshape(-1)
            drop = int(alive_idx[keep_value[alive_idx].argmin()])
        else:
            b = int(row_arg[a])
            drop = a if keep_value[a] <= keep_value[b] else b
        order.append(drop)
        alive[drop] = False
        mi[drop], mi[:, drop] = -math.inf, -math.inf
        row_max[drop] = -math.inf
        stale = torch.nonzero((row_arg == drop) & alive).reshape(-1)
        if len(stale):
            row_max[stale], row_arg[stale] = mi[stale].max(1)
    order.append(int(torch.nonzero(alive)[0]))
    return torch.tensor(order)


def mrmr_order(mi: torch.Tensor, relevance: torch.Tensor, weight: float) -> torch.Tensor:
    """Drop, one at a time, the neuron with the lowest relevance - weight × mean MI with the kept ones."""
    known = torch.isfinite(mi)
    mi0 = torch.where(known, mi, torch.zeros((), dtype=mi.dtype))
    red_sum, count = mi0.sum(1), known.sum(1).to(mi.dtype)
    alive = torch.ones(mi.shape[0], dtype=torch.bool)
    order = []
    for _ in range(mi.shape[0]):
        value = relevance - weight * red_sum / count.clamp_min(1)
        drop = int(torch.where(alive, value, torch.full_like(value, math.inf)).argmin())
        order.append(drop)
        alive[drop] = False
        red_sum -= mi0[:, drop]
        count -= known[:, drop].to(mi.dtype)
    return torch.tensor(order)


def paper_order(mi: torch.Tensor, keep_value: torch.Tensor, quantile: float, gen: torch.Generator) -> torch.Tensor:
    """Random kept pairs; drop the lower-`keep_value` member when I > the threshold, else the
    most redundant sampled pair (so the order covers every width)."""
    m = mi.shape[0]
    finite = mi[torch.isfinite(mi)]
    threshold = torch.quantile(finite.double(), quantile).item() if len(finite) else math.inf
    alive = torch.ones(m, dtype=torch.bool)
    order = []
    for _ in range(m - 1):
        idx = torch.nonzero(alive).reshape(-1)
        a = idx[torch.randint(len(idx), (len(idx),), generator=gen)]
        b = idx[torch.randint(len(idx), (len(idx),), generator=gen)]
        values = mi[a, b]
        above = torch.nonzero(values > threshold).reshape(-1)
        pick = int(above[0]) if len(above) else int(values.argmax())
        if values[pick] == -math.inf:
            drop = int(idx[keep_value[idx].argmin()])
        else:
            pa, pb = int(a[pick]), int(b[pick])
            drop = pa if keep_value[pa] <= keep_value[pb] else pb
        order.append(drop)
        alive[drop] = False
    order.append(int(torch.nonzero(alive)[0]))
    return torch.tensor(order)


# -- one layer -----------------------------------------------------------------------------


def conditional_residuals(z: torch.Tensor, gram: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Each column's residual after regressing it on all the others: (z G⁻¹)_k / [G⁻¹]_kk (G over all tokens)."""
    from edgeprune.compensate import damped_inverse

    ginv = damped_inverse(gram, damping)
    return ((z.double() @ ginv) / ginv.diagonal()).to(z.dtype)


def ffn_layer_orders(
    z: torch.Tensor, w: torch.Tensor, opts: MIOptions, gen: torch.Generator, gram: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Scores of one layer's FFN neurons (one tensor; `paper`: one per seed) from activations z [n, N].

    `gram` (AᵀA of the layer's activations over all calibration tokens) is what `conditional` regresses on.
    `conditional` runs in float64: at γ = 16 the kernel is nearly flat and one neuron's residual moves it by
    parts per billion, which float32 sums round away (its scores were noise: benchmarks/RESULTS.md, issue 13).
    """
    z = z.double() if opts.alpha != 2.0 or opts.selection == "conditional" else z.float()
    w = w.to(z.dtype)
    sample = position_pairs(z.shape[0], opts.max_pairs, gen)
    if opts.selection == "output-info":
        return [ffn_output_info(z, w, opts, sample)]
    if opts.selection == "conditional":
        return [ffn_output_info(z, w, opts, sample, removed=conditional_residuals(z, gram))]
    w_norm = w.norm(dim=0)
    c = z * w_norm if opts.scale == "contribution" else z
    sigma = kernel_widths(c, opts.width_rule, opts.width_scope, opts.gamma)
    labels = kmeans_labels(c, opts.clusters, gen)
    ent, mi = entropy_and_mi(c, sigma, opts.alpha, opts.needs_pairs, labels, sample)
    if opts.selection == "entropy":
        return [ent]
    if opts.selection == "mrmr":
        return [order_to_scores(mrmr_order(mi, ent, opts.redundancy_weight))]
    keep_value = ent if opts.member == "entropy" else z.square().mean(0) * w_norm.square()
    if opts.selection == "redundancy":
        return [order_to_scores(redundancy_order(mi, keep_value))]
    return [order_to_scores(paper_order(mi, keep_value, opts.threshold, gen)) for _ in range(opts.seeds)]


# -- choosing among seeds by KL to the dense model -------------------------------------------


def masked_logits(model: nn.Module, adapter: FamilyAdapter, tokens: torch.Tensor, keeps: list[torch.Tensor] | None):
    """Logits with the FFN neurons outside `keeps` zeroed at the output projection (same as cutting them)."""

    def hook_for(mask: torch.Tensor):
        return lambda _module, args: (args[0] * mask, *args[1:])

    handles = []
    if keeps is not None:
        for layer, keep in zip(adapter.layers(model), keeps, strict=True):
            mask = torch.zeros(adapter.widths(layer).ffn)
            mask[keep] = 1.0
            handles.append(adapter.ffn_output(layer).register_forward_pre_hook(hook_for(mask)))
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits.float()
    finally:
        for handle in handles:
            handle.remove()


def choose_seed(
    model: nn.Module, adapter: FamilyAdapter, holdout: torch.Tensor, candidates: list[list[torch.Tensor]], opts
) -> int:
    """Index of the candidate (per-layer scores) whose pruned model is closest in KL to the dense one."""
    dense = torch.log_softmax(masked_logits(model, adapter, holdout, None), -1)
    kls = []
    for scores in candidates:
        keeps = [torch.topk(s, max(1, round(len(s) * (1 - opts.kl_sparsity)))).indices for s in scores]
        pruned = torch.log_softmax(masked_logits(model, adapter, holdout, keeps), -1)
        kls.append(float((dense.exp() * (dense - pruned)).sum(-1).mean()))
    return min(range(len(kls)), key=kls.__getitem__)


# -- the criterion ---------------------------------------------------------------------------


def ffn_grams(model: nn.Module, adapter: FamilyAdapter, calibration: torch.Tensor) -> list[torch.Tensor]:
    """AᵀA (float64) of every layer's FFN activations over all calibration tokens, for `conditional`."""
    from edgeprune.compensate import dense_ffn_grams

    return [gram.xtx for gram in dense_ffn_grams(model, adapter, calibration)]


def hold_out_for_kl(calibration: torch.Tensor, opts: MIOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Statistics batch and (for `paper`) held-out sequences for the KL choice."""
    if opts.selection != "paper" or opts.seeds == 1:
        return calibration, None
    if len(calibration) < 2:
        raise EdgepruneError("mi selection=paper holds out calibration sequences for its KL check: give at least 2")
    n_hold = max(1, len(calibration) // 4)
    return calibration[:-n_hold], calibration[-n_hold:]


@register("mi", MIOptions, needs_calibration=True)
def score_mi(model: nn.Module, adapter: FamilyAdapter, inputs: ScoringInputs) -> GroupScores:
    opts: MIOptions = inputs.options
    calibration, holdout = hold_out_for_kl(inputs.calibration, opts)
    gen = torch.Generator().manual_seed(inputs.seed)
    layers = adapter.layers(model)

    def sampled(module_of):
        stats = collect_channel_stats(model, adapter, calibration, module_of, opts.n_positions, inputs.seed)
        return [s.sampled for s in stats]

    ffn_acts = sampled(adapter.ffn_output)
    grams = ffn_grams(model, adapter, calibration) if opts.selection == "conditional" else [None] * len(layers)
    per_layer = []
    for i, (z, layer, gram) in enumerate(zip(ffn_acts, layers, grams, strict=True)):
        per_layer.append(ffn_layer_orders(z, adapter.ffn_output(layer).weight.detach(), opts, gen, gram))
        inputs.report("mi: FFN layers", i + 1, len(layers))
    del ffn_acts
    choice = 0
    if len(per_layer[0]) > 1:
        choice = choose_seed(model, adapter, holdout, [list(c) for c in zip(*per_layer, strict=True)], opts)
    head_acts = sampled(adapter.head_output)
    heads = [
        head_entropy(
            x,
            adapter.head_output(layer).weight.detach().float(),
            adapter.widths(layer).heads,
            opts,
            position_pairs(x.shape[0], opts.max_pairs, gen),
        )
        for x, layer in zip(head_acts, layers, strict=True)
    ]
    return GroupScores(ffn=[orders[choice].float() for orders in per_layer], heads=[h.float() for h in heads])
