"""Consolidate a distributed (sharded) checkpoint into one file.

The same as `litgpt-mm consolidate` (code: `litgpt_mm/training/consolidate.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("consolidate")
