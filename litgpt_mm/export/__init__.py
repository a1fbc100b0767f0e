"""Exporting a trained multimodal checkpoint out of the project: Hugging Face (`hf`) and GGUF (`gguf`) directories.

`litgpt_mm.export.load` reads any checkpoint `generate/mm.py` answers from into plain weights; `litgpt_mm.export.hf`
writes a `transformers` directory; `litgpt_mm.export.gguf` writes llama.cpp files. `scripts/export.py` is the CLI.
"""
