"""Prepare the RedPajama data.

The same as `litgpt-mm prepare redpajama` (code: `litgpt_mm/data/prepare_redpajama.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("prepare", "redpajama")
