"""The comparison study: MoE against dense, Gutenberg against RedPajama.

The same as `litgpt-mm compare` (code: `litgpt_mm/compare.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("compare")
