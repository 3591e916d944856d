"""NEFTune from scratch: uniform noise on the input embeddings while training, scaled by alpha/sqrt(L·d).

For a batch of embeddings of shape (B, L, d) the noise is drawn from U(-1, 1) and multiplied by
alpha/sqrt(L·d), so its expected squared size per sequence, alpha²/3, does not depend on how long the
sequence is or how wide the model is. The noise exists in training mode only: in eval mode (and so in
generation) the embeddings are untouched. These are the few lines of Jain et al. (2023), and the same
arithmetic as transformers' `neftune_post_forward_hook`, which TRL switches on with
`neftune_noise_alpha`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def noise_scale(alpha: float, seq_len: int, dim: int) -> torch.Tensor:
    """alpha / sqrt(L·d): the half-width of the uniform noise for sequences of length L and width d."""
    # torch.sqrt of a tensor, not math.sqrt: this is how transformers computes it, and the float32
    # rounding then agrees bit for bit, so the same seed gives the same noise.
    return alpha / torch.sqrt(torch.tensor(seq_len * dim))


def add_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """embeddings + U(-1, 1)·alpha/sqrt(L·d), for embeddings of shape (B, L, d)."""
    if embeddings.ndim != 3:
        raise ValueError(f"expected embeddings of shape (batch, length, dim), got {tuple(embeddings.shape)}")
    scale = noise_scale(alpha, embeddings.size(1), embeddings.size(2))
    return embeddings + torch.zeros_like(embeddings).uniform_(-scale, scale)


def attach_neftune(model: nn.Module, alpha: float) -> RemovableHandle:
    """Add NEFTune noise to the output of the input embedding layer in training mode; returns the hook."""
    if not isinstance(alpha, int | float) or alpha < 0:
        raise ValueError(f"NEFTune alpha must be a number >= 0 (the paper uses 5, 10 or 15), got {alpha!r}")
    embedding = model.get_input_embeddings()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return add_noise(output, alpha) if module.training and alpha > 0 else output

    return embedding.register_forward_hook(hook)


def detach_neftune(handle: RemovableHandle) -> None:
    """Remove a hook returned by attach_neftune (the embeddings are clean again)."""
    handle.remove()


@contextmanager
def neftune(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """`with neftune(model, 5): train...`: the noise hook for the block, removed even if training fails."""
    handle = attach_neftune(model, alpha)
    try:
        yield model
    finally:
        detach_neftune(handle)
