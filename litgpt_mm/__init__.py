"""litgpt-mm: Phi-2 with a mixture of experts after the MLP, CLIP alignment, QLoRA instruction tuning and multimodal
generation on top of litgpt."""

import os
from pathlib import Path

# The source checkout (`pip install -e .`): the bundled sample data under `data/` and the recipes' YAML configs under
# `recipes/configs/` are read from here.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Lightning imports transformers (through torchmetrics), which imports accelerate, which imports torch_xla when it is
# installed: ~4 s per process and a "Defaulting to PJRT_DEVICE=CPU" line. Nothing here uses XLA through
# transformers (the XLA launchers import torch_xla themselves); set USE_TORCH_XLA=1 to restore it.
os.environ.setdefault("USE_TORCH_XLA", "0")
