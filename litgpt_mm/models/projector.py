"""Projectors from CLIP patch features to the language model's embedding width, chosen by name.

* `linear`: one linear map.
* `resblock`: linear to the LM width, then `x + MLP(LayerNorm(x))` with a GELU MLP (the original capstone's).
* `mlp2x_gelu`: linear, GELU, linear (LLaVA-1.5).
"""

from __future__ import annotations

import torch
import torch.nn as nn

PROJECTORS = ("linear", "resblock", "mlp2x_gelu")


class ResBlockProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x + self.mlp(self.norm(x))


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """A projector of type `kind` mapping `in_dim` features to `out_dim`."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "resblock":
        return ResBlockProjector(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"Unknown projector {kind!r}; choose from {PROJECTORS}")
