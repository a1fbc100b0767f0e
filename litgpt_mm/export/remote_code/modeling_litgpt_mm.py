"""A litgpt-mm multimodal model for `transformers` (`trust_remote_code=True`), in plain PyTorch.

Written by litgpt-mm's `scripts/export.py`. Each image becomes `image_seq_length` `<image>` positions that take its
projected CLIP patch features, followed by an `<image_sep>` token whose embedding row is the learned separator; the
processor's chat template places every image before the text, as the model was trained. The LM is Phi-2 (parallel
attention and MLP on one LayerNorm, partial rotary embeddings, a biased head), optionally with a top-k mixture of
experts after a block's MLP:

    h = x + Attn(LN1(x)) + MLP(LN1(x));  y = h + sum_{e in TopK(p)} g_e E_e(LN_moe(h)),
    p = softmax(W_r LN_moe(h)) in fp32,  g_e = p_e / sum_{j in TopK} p_j,  E_e(u) = W2_e GELU(W1_e u + b1_e) + b2_e

Needs only `torch` and `transformers`: the vision tower is `transformers`' `CLIPVisionModel`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_litgpt_mm import LitgptMMConfig
except ImportError:  # loaded as a plain module (not from a transformers dynamic-module package)
    from configuration_litgpt_mm import LitgptMMConfig


def rope_cache(seq_len, n_elem, base, device=None):
    """cos and sin (seq_len, n_elem) of rotary embeddings over the first `n_elem` channels of a head."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    idx_theta = torch.outer(torch.arange(seq_len, device=device).float(), theta).repeat(1, 2)
    return torch.cos(idx_theta), torch.sin(idx_theta)


def apply_rope(x, cos, sin):
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.rotary_dim = cfg["rotary_dim"]
        qkv = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(cfg["hidden_size"], qkv, bias=cfg["bias"])
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg["hidden_size"], bias=cfg["bias"])

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            (self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim), dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        n = self.rotary_dim
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=cfg["bias"])
        self.proj = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=cfg["bias"])
        self.approximate = cfg["gelu_approximate"]

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class MoE(nn.Module):
    """Top-k routed GELU experts with a fp32 router and dropless routing; weights stacked per expert."""

    def __init__(self, cfg):
        super().__init__()
        E, D, H = cfg["n_expert"], cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.k, self.approximate = cfg["n_expert_per_token"], cfg["gelu_approximate"]
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, H, D))
        self.w2 = nn.Parameter(torch.empty(E, D, H))
        if cfg["bias"]:
            self.b1 = nn.Parameter(torch.zeros(E, H))
            self.b2 = nn.Parameter(torch.zeros(E, D))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)
        top_p, top_idx = probs.topk(self.k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(self.w1.size(0)):
            tok, slot = torch.where(top_idx == e)
            if tok.numel() == 0:
                continue
            h = F.linear(x.index_select(0, tok), self.w1[e], None if self.b1 is None else self.b1[e])
            out = F.linear(F.gelu(h, approximate=self.approximate), self.w2[e], None if self.b2 is None else self.b2[e])
            y.index_add_(0, tok, (out * gates[tok, slot, None].to(out.dtype)).to(y.dtype))
        return y.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        eps = cfg["layer_norm_eps"]
        self.norm_1 = nn.LayerNorm(cfg["hidden_size"], eps=eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.moe = None
        if cfg.get("n_expert", 0) and layer_idx in cfg["moe_layers"]:
            self.norm_moe = nn.LayerNorm(cfg["hidden_size"], eps=eps)
            self.moe = MoE(cfg)

    def forward(self, x, cos, sin, mask, cache):
        n = self.norm_1(x)
        x = x + self.attn(n, cos, sin, mask, cache) + self.mlp(n)
        if self.moe is not None:
            x = x + self.moe(self.norm_moe(x))
        return x


class LanguageModel(nn.Module):
    """Phi-2 (with optional MoE sub-layers) from input embeddings to final hidden states; litgpt's key names."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg["vocab_size"], cfg["hidden_size"]),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg["num_hidden_layers"])),
                ln_f=nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"]),
            )
        )

    def forward(self, x, positions, mask, cache):
        cos, sin = rope_cache(int(positions.max()) + 1, self.cfg["rotary_dim"], self.cfg["rope_theta"], x.device)
        cos, sin = cos[positions].to(x.dtype).unsqueeze(1), sin[positions].to(x.dtype).unsqueeze(1)
        for block in self.transformer.h:
            x = block(x, cos, sin, mask, cache)
        return self.transformer.ln_f(x)


class ResBlockProjector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        x = self.proj(x)
        return x + self.mlp(self.norm(x))


def build_projector(kind, in_dim, out_dim):
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "resblock":
        return ResBlockProjector(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}")


class LitgptMMPreTrainedModel(PreTrainedModel):
    config_class = LitgptMMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block", "CLIPEncoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class LitgptMMForConditionalGeneration(LitgptMMPreTrainedModel, GenerationMixin):
    """CLIP tower -> projector -> Phi-2 (+ MoE) LM, with `<image>` positions replaced by projected patch features."""

    def __init__(self, config):
        super().__init__(config)
        text = config.language_config
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**config.vision_tower_config))
        self.projector = build_projector(
            config.projector, config.vision_tower_config["hidden_size"], text["hidden_size"]
        )
        self.language_model = LanguageModel(text)
        self.lm_head = nn.Linear(text["hidden_size"], text["vocab_size"], bias=text["lm_head_bias"])
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.transformer.wte

    def set_input_embeddings(self, value):
        self.language_model.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values):
        """Projected patch features (n_images, image_seq_length, hidden_size) of preprocessed images."""
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer][:, 1:]
        if self.config.vision_feature_normalize:
            features = self.vision_tower.vision_model.post_layernorm(features)
        return self.projector(features)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache_position=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            image = input_ids == self.config.image_token_index
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image, 0))
            if pixel_values is not None:
                features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
                if int(image.sum()) != features.shape[0] * features.shape[1]:
                    raise ValueError(
                        f"{int(image.sum())} <image> positions for {features.shape[0]} image(s) of "
                        f"{features.shape[1]} patches: let the processor expand the <image> tokens"
                    )
                inputs_embeds = inputs_embeds.masked_scatter(image.unsqueeze(-1), features.reshape(-1).contiguous())
        B, T, _ = inputs_embeds.shape
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, -1)
        total = past + T
        keys = torch.arange(total, device=inputs_embeds.device)
        mask = (keys[None, :] <= cache_position[:, None]).view(1, 1, T, total).expand(B, 1, T, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :total].bool()
            mask = mask | (keys[None, :] == cache_position[:, None]).view(1, 1, T, total)  # a pad sees itself
        hidden = self.language_model(inputs_embeds, position_ids, mask, past_key_values if use_cache else None)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, inputs_embeds=None, pixel_values=None, cache_position=None, **kwargs
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            cache_position=cache_position,
            **kwargs,
        )
        if cache_position is None or int(cache_position[0]) == 0:
            inputs["pixel_values"] = pixel_values  # the images enter with the prompt, not with each new token
        return inputs
