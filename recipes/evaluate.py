"""Evaluation (`lm`, `pope`, `caption`, `vqa`, `speech`), beside blind and shuffled-image baselines.

The same as `litgpt-mm evaluate` (code: `litgpt_mm/eval/evaluate.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("evaluate")
