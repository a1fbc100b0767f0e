"""Model configuration: litgpt's `Config` plus a mixture of experts placed after the MLP.

The field names litgpt already has keep their meaning (`n_expert`, `n_expert_per_token`, `moe_intermediate_size`);
in litgpt-mm they describe the MoE sub-layer that follows each block's MLP, while `mlp_class_name` keeps describing
the block's own (dense) MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from litgpt.config import Config as LitConfig
from litgpt.config import name_to_config as lit_name_to_config
from typing_extensions import Self

MOE_IMPLS = ("loop", "grouped", "static", "auto")

_PHI2 = lit_name_to_config["phi-2"]
_TINY = dict(
    hf_config={},
    vocab_size=4096,
    padded_vocab_size=4096,
    padding_multiple=64,
    block_size=256,
    n_embd=128,
    n_layer=4,
    n_head=4,
    rotary_percentage=0.5,
    shared_attention_norm=True,
    lm_head_bias=True,
    gelu_approximate="tanh",
)

configs: list[dict[str, Any]] = [
    # Full Phi-2 width and depth; 8 experts each a quarter of the MLP's width, top-2 (active MoE FLOPs: half the MLP's)
    dict(_PHI2, name="phi-2-moe", hf_config={}, n_expert=8, n_expert_per_token=2, moe_intermediate_size=2560),
    # Dense twin of phi-2-moe with the same active FLOPs per token (the MLP widened by k * the expert width).
    dict(_PHI2, name="phi-2-twin", hf_config={}, intermediate_size=4 * 2560 + 2 * 2560),
    # CPU presets for tests and the demo.
    dict(_TINY, name="phi-2-moe-tiny", n_expert=4, n_expert_per_token=2, moe_intermediate_size=128),
    dict(_TINY, name="phi-2-tiny"),
    # Dense twin of phi-2-moe-tiny with the same active FLOPs per token: the MLP is widened by k * moe width.
    dict(_TINY, name="phi-2-tiny-twin", intermediate_size=4 * 128 + 2 * 128),
]
# The same tiny family at other widths (head size 32), for the pretraining study's width sweep.
for _w in (64, 256, 384):
    configs += [
        dict(
            _TINY,
            name=f"phi-2-moe-tiny-{_w}",
            n_embd=_w,
            n_head=_w // 32,
            n_expert=4,
            n_expert_per_token=2,
            moe_intermediate_size=_w,
        ),
        dict(_TINY, name=f"phi-2-tiny-twin-{_w}", n_embd=_w, n_head=_w // 32, intermediate_size=6 * _w),
    ]
name_to_config = {c["name"]: c for c in configs}


@dataclass
class Config(LitConfig):
    """litgpt `Config` with a mixture of experts after the MLP.

    Args (beyond litgpt's):
        moe_aux_loss_coef: weight of the Switch load-balancing loss (perfect balance = 1).
        moe_z_loss_coef: weight of the ST-MoE router z-loss.
        moe_layers: block indices that get a MoE sub-layer; `None` means every block.
        moe_impl: `loop` (reference), `grouped` (sorted tokens, grouped matmuls), `static` (every expert on every
            token, weighted by the gates: fixed shapes and no host sync, for XLA; E / k times the expert FLOPs) or
            `auto` (grouped, or static on XLA devices).
    """

    moe_aux_loss_coef: float = 1e-2
    moe_z_loss_coef: float = 1e-3
    moe_layers: list[int] | None = None
    moe_impl: Literal["loop", "grouped", "static", "auto"] = "auto"

    def __post_init__(self) -> None:
        if self.n_expert < 0:
            raise ValueError(f"n_expert must be >= 0, got {self.n_expert}")
        if self.n_expert > 0:
            if not 1 <= self.n_expert_per_token <= self.n_expert:
                raise ValueError(
                    f"n_expert_per_token (top-k) must be between 1 and n_expert={self.n_expert},"
                    f" got {self.n_expert_per_token}"
                )
            if self.moe_intermediate_size is None or self.moe_intermediate_size <= 0:
                raise ValueError("moe_intermediate_size must be a positive integer when n_expert > 0")
            if self.mlp_class_name == "LLaMAMoE":
                raise ValueError(
                    "litgpt-mm places its experts after the MLP; set mlp_class_name to a dense MLP "
                    "(GptNeoxMLP, LLaMAMLP, GemmaMLP), not LLaMAMoE"
                )
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"moe_layers {bad} are outside the model's blocks 0..{self.n_layer - 1}")
        if self.moe_aux_loss_coef < 0 or self.moe_z_loss_coef < 0:
            raise ValueError("moe_aux_loss_coef and moe_z_loss_coef must be >= 0")
        super().__post_init__()

    def replace(self, **kwargs: Any) -> Self:
        """A copy with some fields changed (derived attributes are recomputed)."""
        from dataclasses import fields

        return type(self)(**{f.name: getattr(self, f.name) for f in fields(self)} | kwargs)

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the blocks that carry a MoE sub-layer."""
        if self.n_expert == 0:
            return []
        return sorted(set(range(self.n_layer) if self.moe_layers is None else self.moe_layers))

    @classmethod
    def available_names(cls) -> list[str]:
        """Our presets followed by litgpt's names."""
        return list(name_to_config) + sorted(lit_name_to_config)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> Self:
        """Build a config from one of our presets or any litgpt config name."""
        if name in name_to_config:
            conf = dict(name_to_config[name])
        elif name in lit_name_to_config:
            conf = dict(lit_name_to_config[name])
        else:
            raise ValueError(
                f"Unknown model name {name!r}. Our presets are {list(name_to_config)}; "
                "litgpt names (e.g. 'phi-2') are accepted too, see `Config.available_names()`."
            )
        conf.update(kwargs)
        return cls(**conf)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Self:
        # mirrors litgpt 0.5.13 `litgpt.config.Config.from_file`, returning our `Config` and refusing an empty file
        with open(path, encoding="utf-8") as fp:
            file_kwargs = yaml.safe_load(fp)
        if not file_kwargs:
            raise ValueError(f"{path} is empty: expected a model config written by `save_config`.")
        file_kwargs.update(kwargs)
        return cls(**file_kwargs)

    @classmethod
    def from_checkpoint(cls, path: Path, **kwargs: Any) -> Self:
        """Load `model_config.yaml` from a checkpoint directory, or a preset named like the directory.

        Mirrors litgpt 0.5.13 `litgpt.config.Config.from_checkpoint`, with our presets as well as litgpt's names.
        """
        path = Path(path)
        if (config_path := path / "model_config.yaml").is_file():
            return cls.from_file(config_path, **kwargs)
        if path.name in name_to_config or path.name in lit_name_to_config:
            return cls.from_name(path.name, **kwargs)
        raise FileNotFoundError(f"{str(path)!r} has no 'model_config.yaml' and is not named after a known config.")
