"""The capacity plan: memory, time and cost of a run on N GPUs.

The same as `litgpt-mm capacity` (code: `litgpt_mm/analysis/capacity_plan.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("capacity")
