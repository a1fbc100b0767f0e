"""Prepare the COCO-2017 captions data.

The same as `litgpt-mm prepare coco` (code: `litgpt_mm/data/prepare_coco.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("prepare", "coco")
