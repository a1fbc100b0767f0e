"""LLaVA with a biased LM head (Phi-2's), for `transformers` with `trust_remote_code=True`.

Written by litgpt-mm's `scripts/export.py`. `transformers`' `LlavaForConditionalGeneration` builds its `lm_head`
without a bias, which Phi-2's head has: this subclass adds it, so the directory loads with no missing or unexpected
keys. Engines that build the text model from its own config (vLLM's Phi keeps the bias) read the same directory as a
stock `LlavaForConditionalGeneration`. Needs only `torch` and `transformers`.
"""

from torch import nn
from transformers import LlavaForConditionalGeneration


class LlavaPhiForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` whose `lm_head` has a bias."""

    def __init__(self, config):
        super().__init__(config)
        text = config.get_text_config()
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=True)
        self.post_init()
