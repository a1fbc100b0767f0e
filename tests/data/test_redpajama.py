"""RedPajama preparation on small files written in the real schema (plain and zstandard jsonl, bad lines)."""

import json

import pytest
import torch
import zstandard
from conftest import DATA
from litgpt.tokenizer import Tokenizer

import litgpt_mm.data.prepare_redpajama
from litgpt_mm.data import redpajama as rp
from litgpt_mm.data import tokens
from litgpt_mm.data.gutenberg import load_book


def paragraphs():
    text = load_book(DATA / "gutenberg" / "pg11_alices_adventures_in_wonderland.txt").text
    return [p.replace("\n", " ") for p in text.split("\n\n") if len(p) > 200]


def row(text, source):
    meta = {"source": source, "language": "en"} if source == "c4" else {"dump": "2023-06", "language": "en"}
    return json.dumps({"text": text, "meta": meta}) + "\n"


@pytest.fixture
def raw_dir(tmp_path):
    paras = paragraphs()
    root = tmp_path / "raw"
    root.mkdir()
    cc = [row(p, "cc") for p in paras[:60]]
    cc.insert(5, json.dumps({"meta": {}}) + "\n")  # no text field
    cc.insert(9, json.dumps({"text": "   "}) + "\n")  # empty text
    (root / "cc_2023-06_sample.jsonl").write_text("".join(cc) + row(paras[60], "cc")[:40])  # truncated last line
    (root / "c4").mkdir()
    c4 = "".join(row(p, "c4") for p in paras[61:120]).encode()
    (root / "c4" / "c4-train.00000-of-01024.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(c4))
    (root / "c4" / "c4-train.00001-of-01024.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    (root / "arxiv_sample.jsonl").write_text(row("An arXiv paper that must not be read.", "arxiv") * 5)
    return root, paras


def test_source_of():
    assert rp.source_of("cc_2019-30_sample.jsonl") == "cc"
    assert rp.source_of("common_crawl/2023-06/en_head_0000.json.gz.dedup.classifier.jsonl.zst") == "cc"
    assert rp.source_of("c4/c4-train.00000-of-01024.jsonl") == "c4"
    assert rp.source_of("c4_sample.jsonl") == "c4" and rp.source_of("wikipedia_sample.jsonl") == "wikipedia"
    assert rp.source_of("notes.jsonl") is None


def test_prepare_redpajama(raw_dir, tmp_path):
    root, paras = raw_dir
    prepare = litgpt_mm.data.prepare_redpajama.prepare
    out = tmp_path / "out"
    summary = prepare(input_dir=root, out_dir=out, max_bytes=0, vocab_size=600, val_fraction=0.1)
    assert summary.documents["train"] + summary.documents["val"] == 60 + 59
    assert summary.documents["val"] >= 1
    skipped = dict(summary.skipped)
    assert "no non-empty string field 'text'" in skipped["cc_2023-06_sample.jsonl:6"]
    assert "no non-empty string field 'text'" in skipped["cc_2023-06_sample.jsonl:10"]
    assert skipped["cc_2023-06_sample.jsonl:63"].startswith("truncated line")
    assert "unreadable" in skipped["c4-train.00001-of-01024.jsonl.zst"]
    assert len(summary.skipped) == 4
    tok = Tokenizer(out / "tokenizer")
    for split in ("train", "val"):
        n = tokens.num_blocks(out / split, 1)
        assert n == summary.tokens[split]
        ids = torch.cat(list(tokens.TokenBlocks(out / split, n)))
        assert int((ids == tok.eos_id).sum()) == summary.documents[split]
    text = tok.decode(torch.cat(list(tokens.TokenBlocks(out / "train", tokens.num_blocks(out / "train", 1)))))
    assert "arXiv" not in text and paras[0][:100] in text


def test_max_bytes_is_split_over_sources(raw_dir, tmp_path):
    root, _ = raw_dir
    prepare = litgpt_mm.data.prepare_redpajama.prepare
    summary = prepare(input_dir=root, out_dir=tmp_path / "out", max_bytes=20_000, vocab_size=400, val_fraction=0.1)
    chars = summary.characters["train"] + summary.characters["val"]
    longest = max(len(p) for p in paragraphs())
    # each source stops once its 10 kB share of UTF-8 bytes is reached (curly quotes: bytes > characters)
    assert 0.95 * 20_000 <= chars <= 20_000 + 2 * longest


def test_no_files_is_a_clear_error(tmp_path):
    prepare = litgpt_mm.data.prepare_redpajama.prepare
    with pytest.raises(SystemExit, match="No RedPajama .* files"):
        prepare(input_dir=tmp_path, out_dir=tmp_path / "out")
    with pytest.raises(SystemExit, match="unknown"):
        prepare(input_dir=tmp_path, sources=["cc", "reddit"])
