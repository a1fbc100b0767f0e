"""`python -m litgpt_mm.serve`: the OpenAI-compatible server.

The same as `litgpt-mm serve` (code: `litgpt_mm/deploy/serve.py`).
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("serve")
