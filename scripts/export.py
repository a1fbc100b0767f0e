"""Export a trained model: Hugging Face LLaVA or GGUF + mmproj for llama.cpp.

The same as `litgpt-mm export` (code: `litgpt_mm/export/convert.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("export")
