"""Stage 4: answer about images, speech and text, streamed.

The same as `litgpt-mm generate` (code: `litgpt_mm/generate.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("generate")
