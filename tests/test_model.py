import litgpt
import pytest
import torch
from litgpt.generate.base import generate

from litgpt_mm.config import Config
from litgpt_mm.model import GPT, load_model, save_checkpoint


def _tiny_moe(**kw) -> GPT:
    model = GPT(Config.from_name("phi-2-moe-tiny", **kw))
    model.apply(model._init_weights)
    return model


def test_dense_model_is_litgpt_phi2():
    cfg = Config.from_name("phi-2-tiny")
    lit_cfg = litgpt.Config(**{f: getattr(cfg, f) for f in litgpt.Config.__dataclass_fields__})
    ref = litgpt.GPT(lit_cfg)
    ours = GPT(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg.padded_vocab_size, (2, 50))
    torch.testing.assert_close(ours(idx), ref(idx), rtol=0, atol=0)
    assert ours.moe_stats() == [] and ours.moe_aux_objective().item() == 0.0


def test_moe_model_adds_moe_after_mlp_and_collects_losses():
    model = _tiny_moe(moe_layers=[0, 2]).train()
    keys = model.state_dict().keys()
    assert "transformer.h.0.moe.w1" in keys and "transformer.h.0.norm_moe.weight" in keys
    assert "transformer.h.1.moe.w1" not in keys
    idx = torch.randint(0, 4096, (2, 32))
    logits = model(idx)
    assert logits.shape == (2, 32, model.config.padded_vocab_size)
    aux, z = model.moe_losses()
    assert len(model.moe_stats()) == 2 and aux.item() >= 1.0 - 1e-5 and z.item() > 0
    objective = model.moe_aux_objective()
    objective.backward()
    assert model.transformer.h[0].moe.router.weight.grad.abs().sum() > 0


def test_embeddings_input_equals_token_input():
    model = _tiny_moe().eval()
    idx = torch.randint(0, 4096, (2, 16))
    torch.testing.assert_close(model(input_embeds=model.embed(idx)), model(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_checkpoint_round_trip(tmp_path):
    model = _tiny_moe().eval()
    save_checkpoint(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"lit_model.pth", "model_config.yaml"}
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    idx = torch.randint(0, 4096, (1, 20))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_load_model_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="lit_model.pth"):
        load_model(tmp_path)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_kv_cache_generation_equals_full_recompute(impl):
    model = _tiny_moe(moe_impl=impl).eval()
    prompt = torch.randint(0, 4096, (7,))
    n_new = 12
    model.set_kv_cache(batch_size=1)
    cached = generate(model, prompt, max_returned_tokens=len(prompt) + n_new, temperature=0.0, top_k=1)
    model.clear_kv_cache()
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(seq[None])[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
    assert cached.tolist() == seq.tolist()


@pytest.mark.slow
def test_tiny_moe_overfits_a_batch_of_gutenberg_text(gutenberg_dir):
    raw = (gutenberg_dir / "pg11_alices_adventures_in_wonderland.txt").read_bytes()
    body = raw[raw.index(b"CHAPTER I.") :][: 4 * 129]
    data = torch.tensor(list(body), dtype=torch.long).view(4, 129)  # byte-level tokens
    torch.manual_seed(0)
    model = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=256, padded_vocab_size=256, block_size=128))
    model.apply(model._init_weights)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        (loss + model.moe_aux_objective()).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at init
    assert losses[-1] < 0.25 * losses[0]


def test_activation_checkpointing_gives_same_loss_and_gradients():
    model = _tiny_moe().train()
    idx = torch.randint(0, 4096, (2, 32))
    grads = []
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        logits = model(idx)
        loss = logits.float().square().mean() + model.moe_aux_objective()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_forward_embeds_with_kv_cache_matches_litgpt():
    """`forward_embeds` + `embed_tokens` (mirroring litgpt 0.5.13 `GPT.forward`) give litgpt's logits on litgpt's
    own `GPT`, with and without the KV cache."""
    from litgpt_mm.model import embed_tokens, forward_embeds

    cfg = Config.from_name("phi-2-tiny")
    ref = litgpt.GPT(litgpt.Config(**{f: getattr(cfg, f) for f in litgpt.Config.__dataclass_fields__})).eval()
    idx = torch.randint(0, cfg.padded_vocab_size, (2, 12))
    torch.testing.assert_close(forward_embeds(ref, embed_tokens(ref, idx)), ref(idx), rtol=0, atol=0)
    ref.set_kv_cache(batch_size=2)
    pos = torch.arange(8)
    want = ref(idx[:, :8], input_pos=pos)
    ref.clear_kv_cache()
    ref.set_kv_cache(batch_size=2)
    torch.testing.assert_close(forward_embeds(ref, embed_tokens(ref, idx[:, :8]), input_pos=pos), want, rtol=0, atol=0)
