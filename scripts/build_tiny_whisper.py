"""A random tiny Whisper in CTranslate2's format, for offline tests and demos of the speech path.

Code: `litgpt_mm/deploy/tiny_whisper.py`; `--help` lists the flags.
"""

from litgpt_mm.cli import run_cli
from litgpt_mm.deploy.tiny_whisper import main

if __name__ == "__main__":
    run_cli(main)
