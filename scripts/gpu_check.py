"""Every CUDA path and GPU benchmark, offline (`make gpu-check`).

The same as `litgpt-mm gpu-check` (code: `litgpt_mm/gpu_check.py`); `--help` lists the flags.
"""

import sys

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    sys.exit(run_command("gpu-check"))
