"""Prepare the LLaVA Instruct-150K data.

The same as `litgpt-mm prepare llava_instruct`
(code: `litgpt_mm/data/prepare_llava_instruct.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("prepare", "llava_instruct")
