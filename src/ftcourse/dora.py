"""DoRA from scratch: a weight split into a magnitude per output row and a unit direction.

    W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖     (norm of each output row, m initialised to ‖W0‖)

The direction is a LoRA-adapted matrix normalised row by row; the magnitude `m` is one trainable number
per output feature. As in the paper (§4.3) and in peft, the norm is treated as a constant in the
backward pass: it is computed with the LoRA weight detached and is itself detached, which saves memory
and changes the gradients only slightly. `magnitude_direction_change` is the paper's ΔM/ΔD analysis;
`length_direction_coupling` measures, row by row, whether length and direction moved together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ftcourse.lora import LoRALinear, check_rank, inject_adapters


class DoRALinear(LoRALinear):
    """y = (m / ‖W0 + s·B·A‖) ⊙ (W0·x + s·B·A·x) + bias; the norm per output row, not differentiated."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, use_rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, use_rslora)
        # B = 0 at the start, so m = ‖W0‖ row by row and W = W0 exactly.
        self.m = nn.Parameter(self.weight_norm().detach().clone())

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B·A‖ for each output row (shape (out,)), with the LoRA weight detached as peft does."""
        W = self.W0.to(self.A.dtype) + self.delta_weight().detach()  # (out, in)
        return torch.linalg.vector_norm(W, dim=1)  # one norm per output row

    def merged_weight(self) -> torch.Tensor:
        """m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ in the base layer's dtype: the weight of the equivalent linear layer."""
        W = self.W0.to(self.A.dtype) + self.delta_weight()
        return ((self.m / torch.linalg.vector_norm(W, dim=1))[:, None] * W).to(self.W0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale W0·x + s·B·A·x by m/‖W0 + s·B·A‖ per output feature, then add the bias."""
        result = self.base(x)  # (..., out): W0·x + bias, in the base layer's dtype
        scale = self.m / self.weight_norm().detach()  # (out,): gradient flows into m, not through the norm
        base_out = result if self.base.bias is None else result - self.base.bias  # W0·x
        lora_out = F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)  # B·A·x, (..., out)
        # Written as W0·x + (scale - 1)·W0·x + scale·s·B·A·x, peft's order of operations: on a bf16/fp16
        # base, W0·x stays the base layer's own result and the correction is added in float32 and rounded
        # to the base dtype once, so ours and peft's round the same numbers the same way.
        correction = (scale - 1) * base_out + scale * lora_out * self.scaling
        return (result + correction).to(result.dtype)

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        return "DoRA " + super().extra_repr().split(" ", 1)[1]


def inject_dora(
    model: nn.Module, targets: str | Iterable[str], rank: int, alpha: float, use_rslora: bool = False
) -> list[str]:
    """Replace the targeted linear layers of `model` in place with DoRALinear; returns the names replaced."""
    check_rank(rank, alpha)
    return inject_adapters(model, targets, lambda layer: DoRALinear(layer, rank, alpha, use_rslora))


def magnitude_direction_change(W0: torch.Tensor, W: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of a weight W against W0: mean |change of row norm|, and mean (1 - cosine) of the rows."""
    if W0.shape != W.shape or W0.ndim != 2:
        raise ValueError(f"need two weight matrices of one shape, got {tuple(W0.shape)} and {tuple(W.shape)}")
    W0, W = W0.double(), W.double()
    # The paper writes weights as (in × out) and takes column norms; our (out × in) rows are its columns.
    delta_m = (torch.linalg.vector_norm(W, dim=1) - torch.linalg.vector_norm(W0, dim=1)).abs().mean()
    delta_d = (1 - F.cosine_similarity(W, W0, dim=1)).mean()
    return float(delta_m), float(delta_d)


def length_direction_coupling(W0: torch.Tensor, W: torch.Tensor) -> float:
    """Across the output rows of one layer: Pearson correlation of relative length change and angle turned.

    Near 1, the rows that turned most also grew most (length and direction move together, as when one
    low-rank update carries both); near 0, the lengths moved independently of the turning. NaN when no row
    turned or no length changed.
    """
    if W0.shape != W.shape or W0.ndim != 2:
        raise ValueError(f"need two weight matrices of one shape, got {tuple(W0.shape)} and {tuple(W.shape)}")
    W0, W = W0.double(), W.double()
    norm0 = torch.linalg.vector_norm(W0, dim=1)
    length = (torch.linalg.vector_norm(W, dim=1) - norm0) / norm0  # (out,): relative change of row length
    angle = torch.arccos(F.cosine_similarity(W, W0, dim=1).clamp(-1.0, 1.0))  # (out,): radians turned
    if length.std() == 0 or angle.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([length, angle]))[0, 1])


def effective_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weight each named layer applies now: merged W0 + ΔW for an adapter, `.weight` for nn.Linear."""
    weights = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            weight = layer.merged_weight() if isinstance(layer, LoRALinear) else layer.weight
            weights[name] = weight.detach().float().clone()
    return weights


def decomposition_changes(
    model: nn.Module, start_weights: Mapping[str, torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """(ΔM, ΔD) of each layer named in `start_weights`, its weight now against the weight it started from."""
    current = effective_weights(model, start_weights)
    return {name: magnitude_direction_change(start_weights[name], current[name]) for name in start_weights}


def saved_activation_bytes(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward after one forward on `batch`, each storage once."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    del out
    model.train(was_training)
    # Frozen weights are saved too (a linear layer keeps its weight to compute the input's gradient), but
    # they are in memory anyway: count only what the forward pass created.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in weights)
