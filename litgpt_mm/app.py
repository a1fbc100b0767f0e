"""`python -m litgpt_mm.app`: the Gradio multi-turn chat.

The same as `litgpt-mm chat` (code: `litgpt_mm/deploy/app.py`).
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("chat")
