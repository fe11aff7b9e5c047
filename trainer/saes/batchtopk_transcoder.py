"""BatchTopK transcoder (``batchtopk_transcoder``): reads one hook, reconstructs another.

A transcoder replaces a model component by a sparse, wider one: it encodes the component's
input (e.g. the MLP input ``blocks.L.ln2.hook_normalized``) and reconstructs its **output**
(``blocks.L.hook_mlp_out``), so its latents are features of the computation rather than of one
activation (Dunefsky et al. 2024; Ameisen et al. 2025's per-layer transcoders for attribution
graphs). Configure the output side with ``hook_name_out`` (or ``hook_spec_out``) and ``d_out``.

Everything else is BatchTopK's (saes/batchtopk.py): the training encoding keeps the batch's
``top_k x n_tokens`` largest pre-activations (the same sparse kernels, without input centring),
AuxK revives dead latents on the output residual ``y - y_hat``, and the shipped encoder is a
JumpReLU with one calibrated fp32 threshold (inference L0 ~ ``top_k``). The two sides are
separate (``transcodes``): the input has its scale (E||x|| = sqrt(d_in)), the output its own
(E||y|| = sqrt(d_out)); ``b_dec`` is the output bias only and starts at the targets' geometric
median; the encoder does not centre its input (as SAELens's transcoders, which have no input
bias), and its initial directions are random, not the decoder's transpose.

SAELens export: ``jumprelu_transcoder`` with theta as every latent's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..architecture_options import ArchitectureOptions
from .base import SAE, SAELensFormat
from .batchtopk import BatchTopKOptions, BatchTopKSAE
from .registration import register


@dataclass
class BatchTopKTranscoderOptions(BatchTopKOptions):
    """Fields of ``batchtopk_transcoder``: BatchTopK's (``top_k``, AuxK, the threshold rule)."""

    transcodes: ClassVar[bool] = True


@register
class BatchTopKTranscoder(BatchTopKSAE):
    """BatchTopK from an input hook to an output hook (module docstring)."""

    architecture: ClassVar[str] = "batchtopk_transcoder"
    Options: ClassVar[type[ArchitectureOptions]] = BatchTopKTranscoderOptions
    inference_rule: ClassVar[str] = (
        "a JumpReLU of the input hook's encoding with one fp32 threshold for every latent, "
        "calibrated on training tokens so that the mean L0 there is top_k, decoded to the "
        "output hook; each token is encoded on its own")

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        fmt = super().saelens_format(folded)
        fmt.architecture = "jumprelu_transcoder"
        return fmt
