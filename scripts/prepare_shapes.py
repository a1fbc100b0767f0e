"""Prepare the shapes-world data.

The same as `litgpt-mm prepare shapes` (code: `litgpt_mm/data/prepare_shapes.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("prepare", "shapes")
