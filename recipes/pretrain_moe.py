"""Stage 1: pretrain Phi-2 + MoE.

The same as `litgpt-mm pretrain` (code: `litgpt_mm/pretrain.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("pretrain")
