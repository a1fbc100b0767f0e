"""Files copied into Hugging Face exports and run there with `trust_remote_code=True`.

They import only `torch` and `transformers` (never litgpt or litgpt_mm): the exported directory must work on a
machine that has neither.
"""
