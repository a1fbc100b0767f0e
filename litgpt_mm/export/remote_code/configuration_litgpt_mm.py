"""Configuration of a litgpt-mm multimodal model exported for `transformers` (`trust_remote_code=True`).

Written by litgpt-mm's `scripts/export.py` for what stock classes cannot express: a Phi-2 LM with a mixture of
experts after the MLP, the `resblock` projector, features read after CLIP's `post_layernorm`. Needs only `torch` and
`transformers`.
"""

from transformers import PretrainedConfig


class LitgptMMConfig(PretrainedConfig):
    """A CLIP vision tower, a projector and a Phi-2 LM (optionally with MoE sub-layers).

    Args:
        vision_tower_config: `CLIPVisionConfig` fields (a dict).
        language_config: the LM's fields (a dict): `vocab_size`, `hidden_size`, `intermediate_size`,
            `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim`, `rotary_dim`, `rope_theta`,
            `layer_norm_eps`, `gelu_approximate` (`tanh` or `none`), `max_position_embeddings`, `bias`,
            `lm_head_bias`, and for the MoE `n_expert`, `n_expert_per_token`, `moe_intermediate_size`, `moe_layers`
            (block indices).
        projector: `linear`, `mlp2x_gelu` or `resblock`.
        vision_feature_layer: which CLIP hidden state feeds the projector (`hidden_states[i]`, -1: the last block).
        vision_feature_normalize: apply CLIP's `post_layernorm` to the features first.
        image_token_index: the `<image>` token id (one position per patch).
        image_seq_length: patches per image.
    """

    model_type = "litgpt_mm"

    def __init__(
        self,
        vision_tower_config=None,
        language_config=None,
        projector="mlp2x_gelu",
        vision_feature_layer=-1,
        vision_feature_normalize=False,
        image_token_index=None,
        image_seq_length=None,
        **kwargs,
    ):
        self.vision_tower_config = dict(vision_tower_config or {})
        self.language_config = dict(language_config or {})
        self.projector = projector
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_normalize = vision_feature_normalize
        self.image_token_index = image_token_index
        self.image_seq_length = image_seq_length
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.language_config.get("vocab_size")

    @property
    def hidden_size(self):
        return self.language_config.get("hidden_size")

    @property
    def num_hidden_layers(self):
        return self.language_config.get("num_hidden_layers")
