"""Every stage end to end on the bundled sample data (`make demo`; `--long` for `make demo-long`).

The same as `litgpt-mm demo` (code: `litgpt_mm/demo.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("demo")
