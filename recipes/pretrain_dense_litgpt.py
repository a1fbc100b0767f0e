"""The dense baseline of the comparison study, through litgpt's own pretrain.

The same as `litgpt-mm pretrain_dense` (code: `litgpt_mm/pretrain_dense.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("pretrain_dense")
