"""Stage 2: align frozen CLIP patches to the LM on COCO captions.

The same as `litgpt-mm align` (code: `litgpt_mm/align.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("align")
