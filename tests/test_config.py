import pytest

from litgpt_mm.config import Config


def test_presets_and_litgpt_names_resolve():
    moe = Config.from_name("phi-2-moe")
    assert (moe.n_embd, moe.n_layer, moe.n_expert, moe.n_expert_per_token) == (2560, 32, 8, 2)
    assert moe.moe_layer_indices == list(range(32))
    phi2 = Config.from_name("phi-2")
    assert phi2.n_expert == 0 and phi2.n_embd == 2560 and phi2.moe_layer_indices == []
    tiny = Config.from_name("phi-2-moe-tiny", moe_layers=[1, 3])
    assert tiny.moe_layer_indices == [1, 3]
    assert Config.from_name("phi-2-tiny").n_expert == 0
    assert tiny.moe_aux_loss_coef == 1e-2
    assert tiny.moe_z_loss_coef == 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_expert_per_token=5), "n_expert_per_token"),
        (dict(moe_impl="fast"), "moe_impl must be one of"),
        (dict(moe_layers=[7]), "outside the model's blocks"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(mlp_class_name="LLaMAMoE"), "after the MLP"),
    ],
)
def test_bad_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config.from_name("phi-2-moe-tiny", **kwargs)


def test_unknown_name_lists_presets():
    with pytest.raises(ValueError, match="phi-2-moe-tiny"):
        Config.from_name("phi-3-moe-huge")


def test_from_file_and_from_checkpoint_match_litgpt(tmp_path):
    """Parity with litgpt 0.5.13 `Config.from_file` / `from_checkpoint` (which ours mirror): a directory's
    `model_config.yaml` and a directory named after a litgpt config give litgpt's values in every litgpt field."""
    import litgpt
    from litgpt.utils import save_config

    lit = litgpt.Config.from_name("phi-2", n_layer=3, block_size=256)
    save_config(lit, tmp_path)
    named = tmp_path / "phi-2"
    named.mkdir()
    for ours, theirs in (
        (Config.from_file(tmp_path / "model_config.yaml"), litgpt.Config.from_file(tmp_path / "model_config.yaml")),
        (Config.from_checkpoint(tmp_path), litgpt.Config.from_checkpoint(tmp_path)),
        (Config.from_checkpoint(named), litgpt.Config.from_checkpoint(named)),
    ):
        fields = litgpt.Config.__dataclass_fields__
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert Config.from_checkpoint(tmp_path).n_layer == 3 and Config.from_checkpoint(named).n_layer == 32
