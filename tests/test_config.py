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
