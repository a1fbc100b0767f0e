"""Prepare the Project Gutenberg data.

The same as `litgpt-mm prepare gutenberg` (code: `litgpt_mm/data/prepare_gutenberg.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("prepare", "gutenberg")
