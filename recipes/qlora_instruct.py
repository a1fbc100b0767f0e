"""Stage 3: QLoRA instruction tuning on LLaVA Instruct-150K.

The same as `litgpt-mm finetune` (code: `litgpt_mm/finetune/qlora.py`); `--help` lists the flags.
"""

from litgpt_mm.__main__ import run_command

if __name__ == "__main__":
    run_command("finetune")
