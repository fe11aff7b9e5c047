"""BatchTopK forward/backward kernels.

``topk_sae_forward`` is the hot path of a BatchTopK training step. This first version is the
dense reference (plain autograd); a sparse implementation with the same signature and the same
outputs/gradients replaces it (see bench/train_step.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TopKForward(NamedTuple):
    """Outputs of one BatchTopK encode/decode over a flat batch of N tokens."""

    x_hat: Tensor  # [N, d_in] reconstruction (in the SAE's input space), differentiable
    values: Tensor  # [M] selected activations (> 0), differentiable, M <= k * N
    token_idx: Tensor  # [M] int64 token (row) of each selected activation
    latent_idx: Tensor  # [M] int64 latent (column) of each selected activation
    pre_acts: Tensor  # [N, d_sae] encoder pre-activations (detached), for AuxK and thresholds


def topk_sae_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int
) -> TopKForward:
    """BatchTopK over the whole flat batch: keep the top ``k * N`` ReLU'd pre-activations.

    x: [N, d_in] (already scaled; centring by b_dec happens here), W_enc [d_in, d_sae],
    b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]. Ties and zeros: only strictly positive
    activations are kept, so M can be below k * N.
    """
    n = x.shape[0]
    pre = (x - b_dec) @ W_enc + b_enc
    acts = torch.relu(pre)
    flat = acts.reshape(-1)
    m = min(k * n, flat.numel())
    top = torch.topk(flat, m, sorted=False)
    keep = top.values > 0
    idx = top.indices[keep]
    values = flat[idx]
    token_idx = idx // acts.shape[1]
    latent_idx = idx % acts.shape[1]
    sparse = torch.zeros_like(flat).index_put((idx,), values).reshape_as(acts)
    x_hat = sparse @ W_dec + b_dec
    return TopKForward(x_hat, values, token_idx, latent_idx, pre.detach())
