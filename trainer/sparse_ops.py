"""BatchTopK forward/backward kernels that touch only the selected latents.

A BatchTopK training step needs one dense product, the encoder pre-activations
``(x - b_dec) @ W_enc + b_enc`` ([N, d_sae]), because every pre-activation competes for the
batch's ``k * N`` slots. Everything after the selection involves only the M <= k * N selected
(token, latent) pairs:

* decoder forward ``x_hat[t] = b_dec + sum_m v_m W_dec[l_m]``: a gather-sum by token;
* decoder backward: ``dv_m = g[t_m] . W_dec[l_m]`` (a sampled product) and
  ``dW_dec[l] = sum_m v_m g[t_m]`` (a scatter-sum by latent);
* encoder backward: the gradient w.r.t. the pre-activations is zero outside the selection, so
  ``dW_enc[:, l] = sum_m dv_m xc[t_m]``, ``db_enc[l] = sum_m dv_m`` and
  ``db_dec = -W_enc @ db_enc`` (x itself only gets a gradient when it asks for one).

``topk_sae_forward`` implements this with two ``torch.autograd.Function``s sharing one
:class:`SparsePattern`. ``auxk_reconstruct`` (the AuxK dead-latent term) reuses both when
its selection is sparse among the dead latents, and otherwise runs GEMMs over the dead columns
only (with k_aux = d_in / 2 and a few hundred dead latents, that is cheaper than gathers).
``topk_sae_forward_reference`` and ``auxk_reconstruct_reference`` are the plain dense autograd
definitions the fast paths are tested against.

Selection (:func:`batch_topk_indices`) is exact: a threshold estimated from a uniform random
sample of the pre-activations (an order statistic, so the candidate count does not depend on
how skewed the data are), one pass to collect the candidates above it, and an exact cut among
the candidates. When the estimate is too high (fewer candidates than slots) it retries lower and
finally falls back to all positive pre-activations, so the result never depends on luck.
Ties at the cut are broken towards the lowest flat index, which makes the selection
deterministic.

**Input and output sides.** x is [N, d_in], the decoder maps to d_out (``W_dec`` [d_sae, d_out],
``b_dec`` [d_out]): an SAE has d_out = d_in, a transcoder need not. The input is centred by
``b_in`` before the encoder: by default (``b_in=TIED``) that is ``b_dec`` itself, as an SAE
does (its gradient then gathers both uses); a transcoder passes ``b_in=None`` (no centring: no
subtraction, no extra gradient) or its own input bias. The SAE path runs exactly the operations
it ran before this option existed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TIED",
    "AuxKForward",
    "SparsePattern",
    "TopKForward",
    "auxk_reconstruct",
    "auxk_reconstruct_reference",
    "batch_topk_indices",
    "topk_sae_forward",
    "topk_sae_forward_reference",
    "topk_per_token_forward",
    "prefix_decodes",
]

# Size of the random sample the selection threshold is estimated from.
_SAMPLE_SIZE = 1 << 16
# Safety margin of the threshold, in binomial standard deviations of the sample count.
_MARGIN_SIGMAS = 6.0
# Fixed seed of the private sampling generator: the selection never touches the global RNG,
# so training stays bit-for-bit reproducible whatever the kernel does.
_SAMPLE_SEED = 0x5AE
# AuxK selections denser than this among the dead columns run as GEMMs over those columns.
_AUXK_DENSE_DENSITY = 0.05


class _Tied:
    """``b_in=TIED``: the input is centred by ``b_dec`` (an SAE)."""

    def __repr__(self) -> str:
        return "TIED"


TIED = _Tied()


def _input_bias(b_in, b_dec: Tensor):
    """The tensor the input is centred by (None: no centring)."""
    return b_dec if b_in is TIED else b_in


def _centred(x: Tensor, b_in) -> Tensor:
    return x if b_in is None else x - b_in


class TopKForward(NamedTuple):
    """Outputs of one BatchTopK encode/decode over a flat batch of N tokens."""

    x_hat: Tensor  # [N, d_out] reconstruction (in the SAE's output space), differentiable
    values: Tensor  # [M] selected activations (> 0), differentiable, M <= k * N
    token_idx: Tensor  # [M] int64 token (row) of each selected activation
    latent_idx: Tensor  # [M] int64 latent (column) of each selected activation
    pre_acts: Tensor  # [N, d_sae] encoder pre-activations (detached), for AuxK and thresholds


class AuxKForward:
    """Outputs of the AuxK reconstruction from the dead latents.

    ``e_hat`` [N, d_out] is the reconstruction of the residual (no b_dec), differentiable. The
    selection (``values`` [M_aux] > 0, differentiable; ``token_idx``, ``latent_idx`` [M_aux]
    int64, sorted by token then latent) is materialised only when first asked for, since the
    loss needs only ``e_hat``.
    """

    def __init__(self, e_hat: Tensor, selection: Callable[[], tuple[Tensor, Tensor, Tensor]]):
        self.e_hat = e_hat
        self._selection = selection

    @cached_property
    def _selected(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._selection()

    @property
    def values(self) -> Tensor:
        return self._selected[0]

    @property
    def token_idx(self) -> Tensor:
        return self._selected[1]

    @property
    def latent_idx(self) -> Tensor:
        return self._selected[2]


# --------------------------------------------------------------------------------------------
# Dense references
# --------------------------------------------------------------------------------------------


def _check_shapes(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                  b_in=None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be a flat batch [N, d_in]; got shape {tuple(x.shape)}")
    d_in, d_sae = W_enc.shape
    if x.shape[1] != d_in or W_dec.dim() != 2 or W_dec.shape[0] != d_sae:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, "
            f"W_dec {tuple(W_dec.shape)}"
        )
    if b_enc.shape != (d_sae,) or b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"shape mismatch: b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
    if b_in is not None and b_in.shape != (d_in,):
        raise ValueError(f"shape mismatch: the input bias {tuple(b_in.shape)} for x "
                         f"{tuple(x.shape)} (a decoder with d_out != d_in cannot centre the "
                         "input: pass b_in=None)")


def topk_sae_forward_reference(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, *,
    b_in=TIED,
) -> TopKForward:
    """Dense autograd definition of :func:`topk_sae_forward` (for tests and benchmarks).

    Keeps the top ``k * N`` ReLU'd pre-activations of the flat batch (strictly positive only);
    ties at the cut may be broken differently from the fast path.
    """
    b_in = _input_bias(b_in, b_dec)
    _check_shapes(x, W_enc, b_enc, W_dec, b_dec, b_in)
    n = x.shape[0]
    pre = _centred(x, b_in) @ W_enc + b_enc
    acts = torch.relu(pre)
    flat = acts.reshape(-1)
    m = min(k * n, flat.numel())
    top = torch.topk(flat, m, sorted=False)
    idx = top.indices[top.values > 0].sort().values
    values = flat[idx]
    token_idx = idx // acts.shape[1]
    latent_idx = idx % acts.shape[1]
    sparse = torch.zeros_like(flat).index_put((idx,), values).reshape_as(acts)
    x_hat = sparse @ W_dec + b_dec
    return TopKForward(x_hat, values, token_idx, latent_idx, pre.detach())


def auxk_reconstruct_reference(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    *,
    b_in=TIED,
) -> Tensor:
    """Dense autograd definition of the AuxK reconstruction ``e_hat`` [N, d_out].

    Per token, the top ``k_aux`` ReLU'd pre-activations among the dead latents, decoded with
    ``W_dec`` and no ``b_dec`` (the residual it reconstructs already excludes ``b_dec``).
    """
    pre = _centred(x, _input_bias(b_in, b_dec)) @ W_enc + b_enc
    acts = torch.relu(pre)
    masked = torch.where(dead_mask[None, :], acts, torch.zeros((), dtype=acts.dtype))
    kk = min(k_aux, int(dead_mask.sum()))
    if kk == 0:
        return x.new_zeros(x.shape[0], W_dec.shape[1])
    top = masked.topk(kk, dim=1)
    sparse = torch.zeros_like(acts).scatter(1, top.indices, top.values)
    return sparse @ W_dec


# --------------------------------------------------------------------------------------------
# Exact batch top-k selection
# --------------------------------------------------------------------------------------------


def _indices_above(flat: Tensor, thr: Tensor | float) -> Tensor:
    """Ascending flat indices of ``flat > thr``, for a sparse result.

    ``nonzero`` over the full bool mask is the slow part on CPU; reading the mask as int64
    words first (8 flags per word) and expanding only the nonzero words is about twice as fast.
    """
    mask = flat > thr
    if mask.numel() % 8 or mask.numel() < (1 << 16):
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8)[words].nonzero()
    return words[hits[:, 0]] * 8 + hits[:, 1]


def _cut_candidates(flat: Tensor, idx: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Exact top ``m`` of ``flat[idx]`` (idx ascending, a superset of the top ``m``), ties to
    the lowest index: (indices, values)."""
    vals = flat[idx]
    if idx.numel() <= m:
        return idx, vals
    kth = torch.topk(vals, m, sorted=False).values.min()
    keep = vals > kth
    need = m - int(torch.count_nonzero(keep))
    if need > 0:
        ties = vals == kth
        keep |= ties & (torch.cumsum(ties, 0) <= need)
    return idx[keep], vals[keep]


def batch_topk_indices(
    pre: Tensor, m: int, *, sample_size: int | None = None, margin: float | None = None
) -> Tensor:
    """Flat indices (ascending, int64) of the top ``m`` strictly positive entries of ``pre``.

    Equals the index set of ``torch.topk(relu(pre).flatten(), m)`` restricted to positive
    values, with ties at the cut broken towards the lowest flat index. Fewer than ``m`` indices
    come back only when fewer than ``m`` entries are positive.

    ``sample_size`` and ``margin`` (in binomial standard deviations) tune the threshold
    estimate; they change the speed, never the result.
    """
    return _batch_topk(pre, m, sample_size=sample_size, margin=margin)[0]


def _batch_topk(
    pre: Tensor, m: int, *, sample_size: int | None = None, margin: float | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`batch_topk_indices` and the selected values."""
    sample_size = _SAMPLE_SIZE if sample_size is None else sample_size
    margin = _MARGIN_SIGMAS if margin is None else margin
    flat = pre.reshape(-1)
    n = flat.numel()
    m = min(m, n)
    if m <= 0:
        return torch.zeros(0, dtype=torch.long, device=pre.device), flat.new_zeros(0)
    s = min(sample_size, n)
    expected = s * m / n  # how many sample points lie above the true cut, on average
    rank = max(1, math.ceil(expected + margin * math.sqrt(expected) + 8))  # rank from the top
    if rank < s // 2 and s < n:
        gen = torch.Generator(device=flat.device).manual_seed(_SAMPLE_SEED)
        sample = flat[torch.randint(n, (s,), generator=gen, device=flat.device)]
        for _ in range(2):
            thr = torch.kthvalue(sample, s - rank + 1).values
            if thr <= 0:
                break
            idx = _indices_above(flat, thr)
            if idx.numel() >= m:
                return _cut_candidates(flat, idx, m)
            rank = min(4 * rank, s // 2)  # estimate was too high: retry lower
    idx = _indices_above(flat, 0.0)
    return _cut_candidates(flat, idx, m)


# --------------------------------------------------------------------------------------------
# Sparse pattern and the two autograd functions
# --------------------------------------------------------------------------------------------


@dataclass
class SparsePattern:
    """M selected (token, latent) pairs of an [N, d_sae] matrix, sorted by token.

    The grouping by latent that the backward scatter-sums need (:meth:`by_latent`) is computed
    on first use and shared by everything that uses the pattern.
    """

    token_idx: Tensor  # [M] int64, non-decreasing
    latent_idx: Tensor  # [M] int64 (ascending within each token)
    n_tokens: int
    n_latents: int

    def __post_init__(self) -> None:
        counts = torch.bincount(self.token_idx, minlength=self.n_tokens)
        self.token_offsets = torch.zeros(
            self.n_tokens + 1, dtype=torch.long, device=self.token_idx.device
        )
        torch.cumsum(counts, 0, out=self.token_offsets[1:])
        self._by_latent: tuple[Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return self.token_idx.numel()

    def by_latent(self) -> tuple[Tensor, Tensor]:
        """(order [M] int64 grouping the pairs by latent, offsets [d_sae + 1] int64)."""
        if self._by_latent is None:
            key = self.latent_idx.to(torch.int32) if self.n_latents < 2**31 else self.latent_idx
            order = torch.sort(key, stable=True).indices
            counts = torch.bincount(self.latent_idx, minlength=self.n_latents)
            offsets = torch.zeros(self.n_latents + 1, dtype=torch.long, device=order.device)
            torch.cumsum(counts, 0, out=offsets[1:])
            self._by_latent = (order, offsets)
        return self._by_latent

    def gather_sum(self, weights: Tensor, table: Tensor) -> Tensor:
        """out[t] = sum over pairs m of token t of weights[m] * table[latent_m]: [N, d]."""
        if self.nnz == 0:
            return table.new_zeros(self.n_tokens, table.shape[1])
        return torch.nn.functional.embedding_bag(
            self.latent_idx,
            table,
            self.token_offsets[:-1],
            mode="sum",
            per_sample_weights=weights.to(table.dtype),
        )

    def scatter_sum(self, weights: Tensor, rows: Tensor) -> Tensor:
        """out[l] = sum over pairs m of latent l of weights[m] * rows[token_m]: [d_sae, d]."""
        if self.nnz == 0:
            return rows.new_zeros(self.n_latents, rows.shape[1])
        order, offsets = self.by_latent()
        return torch.nn.functional.embedding_bag(
            self.token_idx[order],
            rows,
            offsets[:-1],
            mode="sum",
            per_sample_weights=weights[order].to(rows.dtype),
        )

    def sampled_dot(self, a: Tensor, b: Tensor) -> Tensor:
        """out[m] = a[token_m] . b[latent_m] for every pair: [M]."""
        if self.nnz == 0:
            return a.new_zeros(0)
        if a.dtype in (torch.float32, torch.float64) and a.device.type == "cpu":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                csr = torch.sparse_csr_tensor(
                    self.token_offsets,
                    self.latent_idx,
                    a.new_zeros(self.nnz),
                    (self.n_tokens, self.n_latents),
                )
                return torch.sparse.sampled_addmm(csr, a.contiguous(), b.t()).values()
        out = a.new_empty(self.nnz)
        step = 1 << 14
        for s in range(0, self.nnz, step):
            sl = slice(s, s + step)
            out[sl] = (a[self.token_idx[sl]] * b[self.latent_idx[sl]]).sum(1)
        return out


def _no_autocast(t: Tensor):
    """The sparse parts run in the weights' dtype even under autocast (only the dense encoder
    GEMM, outside these functions, takes autocast's bf16): their backward passes, which run
    without autocast, then see one dtype."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class _SelectedEncode(torch.autograd.Function):
    """values[m] = ((x - b_in) @ W_enc + b_enc)[t_m, l_m], gradient only at the pairs (``b_in``
    None: no centring, no gradient for it)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, xc, pre_values, pattern):  # type: ignore[override]
        ctx.pattern = pattern
        ctx.save_for_backward(xc, W_enc)
        return pre_values.to(W_enc.dtype, copy=True)  # bf16 under autocast -> the weights'


    @staticmethod
    def backward(ctx, dv):  # type: ignore[override]
        xc, W_enc = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        need_x, need_w, need_be, need_bi = ctx.needs_input_grad[:4]
        dx = dW_enc = db_enc = db_in = None
        if need_w:
            dW_enc = p.scatter_sum(dv, xc).t()
        if need_be or need_bi:
            db = torch.zeros(p.n_latents, dtype=dv.dtype, device=dv.device)
            db.index_add_(0, p.latent_idx, dv)
            db_enc = db if need_be else None
            db_in = -(W_enc @ db) if need_bi else None
        if need_x:
            dx = p.gather_sum(dv, W_enc.t().contiguous())
        return dx, dW_enc, db_enc, db_in, None, None, None


class _SparseDecode(torch.autograd.Function):
    """y[t] = sum over pairs m of token t of values[m] * W_dec[l_m] (no bias)."""

    @staticmethod
    def forward(ctx, values, W_dec, pattern):  # type: ignore[override]
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec)
        with _no_autocast(values):
            return pattern.gather_sum(values, W_dec)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        values, W_dec = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        g = g.contiguous()
        dv = p.sampled_dot(g, W_dec) if ctx.needs_input_grad[0] else None
        dW_dec = p.scatter_sum(values, g) if ctx.needs_input_grad[1] else None
        return dv, dW_dec, None


class _DeadColumnsDecode(torch.autograd.Function):
    """e_hat = acts @ W_dec[dead] for dense activations over the D dead columns (zero where not
    selected), with every gradient computed over those columns only: d_acts = g @ W_dec[dead]^T
    masked to the selection, dW_dec[dead] = acts^T g, dW_enc[:, dead] = xc^T d_pre,
    db_enc[dead] = sum d_pre, db_in = -W_enc[:, dead] @ db_enc[dead] (the input bias, when the
    input is centred)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, xc, acts, dead):  # type: ignore[override]
        w_dec_dead = W_dec.index_select(0, dead)
        acts = acts.to(W_dec.dtype)
        ctx.save_for_backward(xc, W_enc, W_dec, acts, dead, w_dec_dead)
        with _no_autocast(acts):
            return acts @ w_dec_dead

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xc, W_enc, W_dec, acts, dead, w_dec_dead = ctx.saved_tensors
        need_x, need_we, need_be, need_bi, need_wd = ctx.needs_input_grad[:5]
        dx = dW_enc = db_enc = db_in = dW_dec = None
        g = g.contiguous()
        if need_wd:
            dW_dec = torch.zeros_like(W_dec).index_copy_(0, dead, acts.t() @ g)
        if not (need_x or need_we or need_be or need_bi):
            return dx, dW_enc, db_enc, db_in, dW_dec, None, None, None
        # selected entries are exactly the positive ones (ReLU'd, zero elsewhere)
        d_pre = (g @ w_dec_dead.t()).mul_(acts > 0)
        if need_we:
            dW_enc = torch.zeros_like(W_enc).index_copy_(1, dead, xc.t() @ d_pre)
        w_enc_dead = W_enc.index_select(1, dead) if (need_x or need_bi) else None
        if need_be or need_bi:
            db = d_pre.sum(0)
            if need_be:
                db_enc = W_enc.new_zeros(W_enc.shape[1]).index_copy_(0, dead, db)
            if need_bi:
                db_in = -(w_enc_dead @ db)
        if need_x:
            dx = d_pre @ w_enc_dead.t()
        return dx, dW_enc, db_enc, db_in, dW_dec, None, None, None


def _encode_decode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_in,
    xc: Tensor,
    pre_values: Tensor,
    pattern: SparsePattern,
) -> tuple[Tensor, Tensor]:
    values = _SelectedEncode.apply(x, W_enc, b_enc, b_in, xc, pre_values, pattern)
    return values, _SparseDecode.apply(values, W_dec, pattern)


# --------------------------------------------------------------------------------------------
# Public kernels
# --------------------------------------------------------------------------------------------


def topk_sae_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, *,
    b_in=TIED,
) -> TopKForward:
    """BatchTopK over the whole flat batch: keep the top ``k * N`` ReLU'd pre-activations.

    x: [N, d_in] (already scaled; centring by ``b_in`` happens here: by default b_dec, an SAE;
    None: none), W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out]. Ties
    and zeros: only strictly positive activations are kept, so M can be below k * N; ties at
    the cut go to the lowest flat index. Outputs are sorted by token, then latent. Same outputs
    and gradients as :func:`topk_sae_forward_reference`, but only the encoder forward is dense.
    """
    b_in = _input_bias(b_in, b_dec)
    _check_shapes(x, W_enc, b_enc, W_dec, b_dec, b_in)
    n, d_sae = x.shape[0], W_enc.shape[1]
    with torch.no_grad():
        xc = _centred(x, b_in)
        pre = torch.addmm(b_enc, xc, W_enc).to(W_enc.dtype)  # bf16 under autocast
        idx, pre_values = _batch_topk(pre, k * n)
        token_idx = torch.div(idx, d_sae, rounding_mode="floor")
        latent_idx = idx - token_idx * d_sae
    pattern = SparsePattern(token_idx, latent_idx, n, d_sae)
    values, decoded = _encode_decode(x, W_enc, b_enc, W_dec, b_in, xc, pre_values, pattern)
    return TopKForward(decoded + b_dec, values, token_idx, latent_idx, pre)


def auxk_reconstruct(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    pre_acts: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    *,
    b_in=TIED,
) -> AuxKForward:
    """AuxK reconstruction from the dead latents, touching only the dead latents.

    Per token, the top ``k_aux`` strictly positive pre-activations among the latents where
    ``dead_mask`` [d_sae] (bool) is true are selected from ``pre_acts`` (the detached
    ``TopKForward.pre_acts`` of the same step) and decoded with ``W_dec`` and no ``b_dec``.
    The selected values are differentiable w.r.t. ``W_enc``, ``b_enc``, the input bias ``b_in``
    (``b_dec`` by default; see :func:`topk_sae_forward`) (and ``x``),
    as in the dense definition :func:`auxk_reconstruct_reference`; ``e_hat`` also w.r.t.
    ``W_dec``. With no dead latent, ``e_hat`` is zeros and the selection empty.

    Work: when the selection is sparse among the dead columns (``k_aux / n_dead`` below
    ``_AUXK_DENSE_DENSITY``) it runs on the selected pairs as the main kernel does; otherwise
    (e.g. the reference k_aux = d_in / 2 with few dead latents) four GEMMs over the dead columns
    only are cheaper than gathers of that many pairs. Both give the same result.
    """
    b_in = _input_bias(b_in, b_dec)
    _check_shapes(x, W_enc, b_enc, W_dec, b_dec, b_in)
    n, d_sae = pre_acts.shape
    if dead_mask.shape != (d_sae,) or dead_mask.dtype != torch.bool:
        raise ValueError(f"dead_mask must be a bool tensor of shape ({d_sae},)")
    if k_aux < 1:
        raise ValueError(f"k_aux must be >= 1; got {k_aux}")
    with torch.no_grad():
        dead = dead_mask.nonzero().squeeze(1)
        kk = min(k_aux, dead.numel())
        if kk == 0:
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return AuxKForward(x.new_zeros(n, W_dec.shape[1]),
                               lambda: (x.new_zeros(0), empty, empty))
        sub = pre_acts.index_select(1, dead)  # [N, D]
        xc = _centred(x, b_in)
        if kk < dead.numel():
            top = sub.topk(kk, dim=1, sorted=False)
            cols, vals = top.indices, top.values
        else:
            cols, vals = torch.arange(kk, device=x.device).expand(n, kk), sub

    def selected_pairs() -> tuple[Tensor, Tensor, Tensor]:
        """(token_idx, latent_idx, pre-activation) of the positive selections, sorted."""
        with torch.no_grad():
            sorted_cols, order = cols.sort(dim=1)
            sorted_vals = vals.gather(1, order)
            keep = sorted_vals > 0
            token_idx = torch.arange(n, device=x.device)[:, None].expand(n, kk)[keep]
            return token_idx, dead[sorted_cols[keep]], sorted_vals[keep]

    if kk / dead.numel() >= _AUXK_DENSE_DENSITY:
        with torch.no_grad():
            acts = torch.zeros_like(sub).scatter_(1, cols, vals.clamp(min=0))
        e_hat = _DeadColumnsDecode.apply(x, W_enc, b_enc, b_in, W_dec, xc, acts, dead)

        def selection() -> tuple[Tensor, Tensor, Tensor]:
            token_idx, latent_idx, pre_values = selected_pairs()
            pattern = SparsePattern(token_idx, latent_idx, n, d_sae)
            values = _SelectedEncode.apply(x, W_enc, b_enc, b_in, xc, pre_values, pattern)
            return values, token_idx, latent_idx

        return AuxKForward(e_hat, selection)
    token_idx, latent_idx, pre_values = selected_pairs()
    pattern = SparsePattern(token_idx, latent_idx, n, d_sae)
    values, e_hat = _encode_decode(x, W_enc, b_enc, W_dec, b_in, xc, pre_values, pattern)
    return AuxKForward(e_hat, lambda: (values, token_idx, latent_idx))


def topk_per_token_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, *,
    b_in=TIED,
) -> TopKForward:
    """TopK per token (Gao et al.): keep each token's ``k`` largest pre-activations, then ReLU
    (so a token keeps fewer than ``k`` when fewer are positive). Same inputs and outputs as
    :func:`topk_sae_forward`, and the same sparse backward; only the selection differs."""
    b_in = _input_bias(b_in, b_dec)
    _check_shapes(x, W_enc, b_enc, W_dec, b_dec, b_in)
    n, d_sae = x.shape[0], W_enc.shape[1]
    k = min(int(k), d_sae)
    with torch.no_grad():
        xc = _centred(x, b_in)
        pre = torch.addmm(b_enc, xc, W_enc).to(W_enc.dtype)  # bf16 under autocast
        top = pre.topk(k, dim=1, sorted=False)
        cols, order = top.indices.sort(dim=1)  # ascending latent within each token
        vals = top.values.gather(1, order)
        keep = vals > 0
        token_idx = torch.arange(n, device=x.device)[:, None].expand(n, k)[keep]
        latent_idx = cols[keep]
        pre_values = vals[keep]
    pattern = SparsePattern(token_idx, latent_idx, n, d_sae)
    values, decoded = _encode_decode(x, W_enc, b_enc, W_dec, b_in, xc, pre_values, pattern)
    return TopKForward(decoded + b_dec, values, token_idx, latent_idx, pre)


def prefix_decodes(
    out: TopKForward, W_dec: Tensor, b_dec: Tensor, widths: tuple[int, ...]
) -> list[Tensor]:
    """Reconstructions from nested prefixes of the dictionary (Matryoshka): for each width w
    in ``widths`` (increasing, the last one d_sae), ``b_dec + sum of the selected pairs with
    latent < w`` [N, d_out], differentiable like ``out.x_hat``. The last entry is ``out.x_hat``
    itself; the others cost one sparse decode in all (each pair is decoded in its own group)."""
    n = out.x_hat.shape[0]
    d_sae = W_dec.shape[0]
    recon = b_dec.expand(n, -1)
    prefixes: list[Tensor] = []
    lo = 0
    for w in widths[:-1]:
        with torch.no_grad():
            sel = (out.latent_idx >= lo) & (out.latent_idx < w)
        pattern = SparsePattern(out.token_idx[sel], out.latent_idx[sel], n, d_sae)
        recon = recon + _SparseDecode.apply(out.values[sel], W_dec, pattern)
        prefixes.append(recon)
        lo = w
    prefixes.append(out.x_hat)
    return prefixes
