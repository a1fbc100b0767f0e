"""`litgpt_mm.analysis.experts`: routing capture, expert × source shares, top tokens, plots, summary and CLI."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import DATA

from litgpt_mm.analysis import experts as ea
from litgpt_mm.model import load_model
from litgpt_mm.training.checkpoint import load_tokenizer

# three short bundled books, one of them French
BOOKS = ["pg43_strange_case_of_dr_jekyll_and_mr_hyde.txt", "pg5200_metamorphosis.txt", "pg4650_candide_fr.txt"]
GUTENBERG = DATA / "gutenberg"
SEQ_LEN, MAX_TOKENS = 32, 200  # 200 = 6 full windows + one of 8 tokens per book


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("books")
    for name in BOOKS:
        shutil.copy(GUTENBERG / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_lm(books_dir, tmp_path_factory):
    """A random tiny MoE LM checkpoint with a small BPE trained on the three books (like `checkpoints["lm"]`, without
    preparing all 13 books)."""
    from litgpt_mm.config import Config
    from litgpt_mm.data.tokens import train_bpe_tokenizer
    from litgpt_mm.model import GPT, save_checkpoint

    root = tmp_path_factory.mktemp("lm")
    texts, _ = ea.read_books(books_dir)
    train_bpe_tokenizer(list(texts.values()), 512, root)
    torch.manual_seed(0)
    save_checkpoint(GPT(Config.from_name("phi-2-moe-tiny", vocab_size=512, padded_vocab_size=512)), root)
    return root


@pytest.fixture(scope="module")
def routed(tiny_lm, books_dir):
    """(model, tokenizer, texts, languages, table, MoE inputs seen by each layer during `route_texts`)."""
    model, tokenizer = load_model(tiny_lm).eval(), load_tokenizer(tiny_lm)
    texts, languages = ea.read_books(books_dir)
    inputs = [[] for _ in model.moe_layers]
    handles = [
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0].detach().clone()))
        for i, m in enumerate(model.moe_layers)
    ]
    table = ea.route_texts(model, tokenizer, texts, SEQ_LEN, MAX_TOKENS, batch_size=4)
    for h in handles:
        h.remove()
    return model, tokenizer, texts, languages, table, inputs


def test_read_books_cleans_and_labels_languages(books_dir):
    texts, languages = ea.read_books(books_dir)
    assert list(texts) == ["Strange Case of Dr Jeky…", "Candide", "Metamorphosis"]
    assert languages == {"Strange Case of Dr Jeky…": "en", "Candide": "fr", "Metamorphosis": "en"}
    assert all("PROJECT GUTENBERG EBOOK" not in t.upper()[:2000] for t in texts.values())


def test_routing_table_matches_a_direct_router_call(routed):
    model, tokenizer, texts, _, table, inputs = routed
    k, E = model.config.n_expert_per_token, model.config.n_expert
    assert np.bincount(table.source).tolist() == [MAX_TOKENS] * len(texts)
    expected_ids = torch.cat([torch.cat(ea.text_windows(tokenizer, t, SEQ_LEN, MAX_TOKENS)) for t in texts.values()])
    assert np.array_equal(table.token_ids, expected_ids.numpy())
    assert table.experts.shape == (len(model.moe_layers), len(table.token_ids), k)
    # every token goes to exactly k distinct experts in every layer
    assert all(len(set(row)) == k for row in table.experts.reshape(-1, k).tolist())
    assert table.experts.min() >= 0 and table.experts.max() < E
    with torch.no_grad():
        for layer, moe in enumerate(model.moe_layers):
            # the router called directly on each forward's input (as `MoE.forward` does)
            top_idx = torch.cat([moe.route(x.reshape(-1, x.size(-1)))[1] for x in inputs[layer]])
            assert np.array_equal(table.experts[layer], top_idx.numpy())
            counts = torch.bincount(top_idx.reshape(-1), minlength=E).numpy()
            assert np.array_equal(table.counts(layer).sum(1), counts)
    entropy = table.entropy_sum.sum(1) / len(table.token_ids)
    assert np.all(entropy > 0) and np.all(entropy <= math.log(E) + 1e-6)
    np.testing.assert_allclose(table.prob_sum.sum(-1), np.bincount(table.source)[None].repeat(len(inputs), 0))


def test_shares_columns_sum_to_one_and_language_split(routed):
    *_, languages, table, _ = routed
    shares = ea.expert_by_source(table)
    np.testing.assert_allclose(shares.share.sum(1), 1.0)
    np.testing.assert_allclose(shares.lift * shares.overall[:, :, None], shares.share)
    by_language = ea.language_split(table, languages)
    assert by_language.sources == ["en", "fr"]
    np.testing.assert_allclose(by_language.share.sum(1), 1.0)
    # English = the token-weighted mean of the English books' columns (equal token counts here)
    english = [i for i, s in enumerate(shares.sources) if languages[s] == "en"]
    np.testing.assert_allclose(by_language.share[:, :, 0], shares.share[:, :, english].mean(-1))
    np.testing.assert_allclose(by_language.share[:, :, 1], shares.share[:, :, shares.sources.index("Candide")])


class _Ids:
    def decode(self, ids: torch.Tensor) -> str:
        return f"<{ids.item()}>"


def _hand_made() -> ea.RoutingTable:
    """10 tokens, 3 experts, top-2: token 5 -> (0, 1) ×4, token 7 -> (1, 2) ×3, token 9 -> (0, 2) ×2 and (1, 2) ×1;
    slots per expert 6, 8, 6; sources: the first five tokens and the last five. Uniform router probabilities."""
    ids = np.array([5, 5, 5, 5, 7, 7, 7, 9, 9, 9])
    experts = np.array([[0, 1]] * 4 + [[1, 2]] * 3 + [[0, 2]] * 2 + [[1, 2]])[None]
    source = np.array([0] * 5 + [1] * 5)
    return ea.RoutingTable(["a", "b"], source, ids, experts, np.full((1, 2, 3), 5 / 3), np.zeros((1, 2)), [0])


def test_top_tokens_and_shares_on_a_hand_made_table():
    table = _hand_made()
    top = ea.top_tokens(table, _Ids(), k=10, min_count=2)[0]
    # P(token | expert) / P(token), with P(5) = 0.4, P(7) = P(9) = 0.3
    assert [(t.text, t.count) for t in top[0]] == [("<5>", 4), ("<9>", 2)]
    assert [t.ratio for t in top[0]] == pytest.approx([(4 / 6) / 0.4, (2 / 6) / 0.3])
    assert [(t.token_id, t.count) for t in top[1]] == [(5, 4), (7, 3)]  # equal ratios 1.25: the more frequent first
    assert [t.ratio for t in top[1]] == pytest.approx([1.25, 1.25])  # token 9 (1 slot) is below min_count
    assert {t.token_id for t in top[2]} == {7, 9} and [t.ratio for t in top[2]] == pytest.approx([5 / 3, 5 / 3])
    assert [t.token_id for t in ea.top_tokens(table, _Ids(), k=1, min_count=1)[0][1]] == [5]

    shares = ea.expert_by_source(table)
    np.testing.assert_allclose(shares.share[0], [[0.4, 0.2], [0.5, 0.3], [0.1, 0.5]])
    np.testing.assert_allclose(shares.overall[0], [0.3, 0.4, 0.3])
    np.testing.assert_allclose(shares.lift[0, 0], [0.4 / 0.3, 0.2 / 0.3])
    (row,) = ea.routing_balance(table)
    assert row["balance_loss"] == pytest.approx(1.0)  # uniform probabilities: E Σ f (1/E) = 1 whatever the load
    assert row["cv"] == pytest.approx(np.std([6, 8, 6]) / (20 / 3))


def _expert_rows(steps: int = 30, layers: int = 4, n_expert: int = 4) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, steps + 1):
        for layer in range(layers):
            load = rng.dirichlet(np.full(n_expert, 5.0 * step))
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "cv": float(load.std() / load.mean()),
                    "entropy": 1.2,
                    **{f"e{i}": float(v) for i, v in enumerate(load)},
                }
            )
    return rows, [{"step": s, "aux_loss": 1 + 0.5 / s} for s in range(1, steps + 1)]


def test_plots_and_summary(routed, tmp_path):
    from PIL import Image

    *_, languages, table, _ = routed
    shares = ea.expert_by_source(table)
    heat = ea.plot_expert_heatmaps(shares, tmp_path / "heat.png", languages)
    expert_rows, train_rows = _expert_rows()
    over = ea.plot_router_over_training(expert_rows, tmp_path / "over.png", train_rows)
    for path in (heat, over):
        assert Image.open(path).size[0] > 600
    training = ea.training_balance(expert_rows, train_rows)
    assert training[0]["balance_loss"] == pytest.approx(1 + 0.5 / 30) and training[0]["steps_averaged"] == 10
    text = ea.summary_markdown(
        table,
        shares,
        ea.top_tokens(table, None),
        ea.routing_balance(table),
        training,
        ea.language_split(table, languages),
        ["heat.png"],
        0.01,
    )
    assert "![heat](heat.png)" in text
    for layer in range(len(table.blocks)):
        assert f"| layer {layer} |" in text and f"**layer {layer}**" in text
    header = next(line for line in text.splitlines() if line.startswith("| layer | Strange"))
    assert all(f" {name} |" in header for name in table.sources) and "| en | fr |" in text
    assert "**On the analysed texts: targets" in text and "**In training: targets" in text


def test_targets_met_and_verdicts():
    good = [
        {
            "layer": 0,
            "balance_loss": 1.01,
            "cv": 0.1,
            "noise_cv": 0.01,
            "prob_cv": 0.01,
            "cv_per_text": 0.1,
            "entropy": 1.0,
            "max_entropy": math.log(4),
        }
    ]
    bad = [dict(good[0], layer=1, cv=0.1502, prob_cv=0.02)]
    assert ea.targets_met(good) == {"texts": True, "training": None}
    assert ea.targets_met(good + bad)["texts"] is False
    lines = ea._balance_section(good + bad, None, ["layer 0", "layer 1"], 0.01)
    assert "**On the analysed texts: targets not met**: CV > 0.15 in layer 1 (0.1502)." in lines
    assert any(
        line.startswith("- Layer 1: load CV 0.1502 above target") and "0.150 × 0.020 = 0.0030" in line for line in lines
    )


def test_cli_writes_plots_and_summary(tiny_lm, books_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for name, rows in zip(("expert_load", "train_log"), _expert_rows(steps=12), strict=True):
        with open(logs / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    out = tmp_path / "out"
    args = ["--checkpoint_dir", str(tiny_lm), "--books_dir", str(books_dir), "--out_dir", str(out),
            "--logs_dir", str(logs), "--seq_len", "64", "--max_tokens_per_text", "128", "--min_count", "2"]  # fmt: skip
    result = ea.main(args)
    assert sorted(p.name for p in out.iterdir()) == [
        "experts.json",
        "experts.md",
        "experts_by_book.png",
        "router_over_training.png",
    ]
    assert (out / "experts.md").read_text() == result["summary"]
    assert result["sources"] == ["Strange Case of Dr Jeky…", "Candide", "Metamorphosis"]
    assert set(result["targets_met"]) == {"texts", "training"}
    np.testing.assert_allclose(np.sum(result["share"], axis=1), 1.0)


def test_cli_reports_a_missing_checkpoint_in_one_line(books_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ea.main(["--checkpoint_dir", str(tmp_path / "nope"), "--books_dir", str(books_dir)])
    assert exit_info.value.code == 2 and "lit_model.pth" in capsys.readouterr().err
