"""Align CLIP to the LM on TPUs: `recipes/align.py`'s loop on an XLA Fabric with static shapes.

    PJRT_DEVICE=TPU python xla/align.py --recipe_config my_align.yaml --devices 8

`--recipe_config` is a YAML of `recipes/align.py` arguments. What differs: `XLAStrategy` data parallelism (only the
projector trains, so the frozen LM is replicated; `--fsdp true` shards an LM too large for one chip), bf16, the
MoE's `static` path, the LM read by one process per host at a time, and every caption padded or cut to
`--caption_bucket` tokens (padding ignored by the loss) so that every step has the same shapes.
"""

from __future__ import annotations

from pathlib import Path

from litgpt_mm.cli import run_cli
from litgpt_mm.model import load_model
from litgpt_mm.training.xla import load_sequentially, recipe_arguments, static_caption_collate, xla_fabric


def setup(
    recipe_config: Path | None = None,
    devices: int | str = "auto",
    fsdp: bool = False,
    caption_bucket: int = 64,
    precision: str = "bf16-true",
) -> None:
    """Run `recipes/align.py`'s stage on TPUs.

    Args:
        recipe_config: YAML of `recipes/align.py` arguments.
        devices: TPU chips.
        fsdp: shard the LM with `XLAFSDPStrategy` instead of replicating it.
        caption_bucket: captions are padded or cut to this many tokens.
        precision: Fabric precision.
    """
    from litgpt_mm import align as recipe

    recipe.coco.collate_pairs = static_caption_collate(caption_bucket)
    args = recipe_arguments(recipe.setup, recipe_config, {"max_caption_tokens": caption_bucket})
    fabric = xla_fabric(devices, fsdp, precision)
    # the frozen LM is read by one process per host at a time, then placed (and sharded) from host memory
    recipe.load_model = lambda lm_dir, device: load_model(
        lm_dir, device, state=load_sequentially(fabric, Path(lm_dir) / "lit_model.pth")
    )
    names = list(recipe.main.__code__.co_varnames[1 : recipe.main.__code__.co_argcount])
    renamed = {"lm_dir": "lm_checkpoint_dir", "optimizer_spec": "optimizer"}
    fabric.launch(recipe.main, *[args[renamed.get(n, n)] for n in names])


if __name__ == "__main__":
    run_cli(setup)
