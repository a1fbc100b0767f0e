"""Offline stage 0: pretrain a small CLIP on the shapes world.

The same as `litgpt-mm pretrain_clip` (code: `litgpt_mm/pretrain_clip.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("pretrain_clip")
