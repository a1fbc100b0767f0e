"""`scripts/prepare_gutenberg.py` at scale: several workers and machines write the same token stream as one, a killed
run resumes without redoing finished chunks, shards go to S3, and bad settings give one line."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, THREADS, run_python, shard_tokens

import litgpt_mm.data.prepare_gutenberg
import litgpt_mm.pretrain
from litgpt_mm.data import remote

COMMON = {"val_fraction": 0.2, "chunk_bytes": "1MB"}  # 10 training and 3 validation books; several chunks each


def cli(out_dir, tokenizer_dir, **extra) -> list[str]:
    args = ["scripts/prepare_gutenberg.py", "--out_dir", str(out_dir), "--tokenizer_dir", str(tokenizer_dir)]
    for key, value in {**COMMON, **extra}.items():
        args += [f"--{key}", str(value)]
    return args


def kill_at_book(victim: str) -> str:
    """`python -c` code running a script (argv[1:]) whose tokenizing workers SIGKILL the whole run at `victim`."""
    return textwrap.dedent(
        f"""
        import os, signal, sys, runpy
        import litgpt_mm.data.prepare as prep
        real = prep.encode_file
        def encode_then_die(path, tokenizer_dir):
            if {victim!r} in path:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return real(path, tokenizer_dir)
        prep.encode_file = encode_then_die
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )


@pytest.fixture(scope="module")
def one_worker(prepared_gutenberg, tmp_path_factory):
    """The bundled books prepared by one worker (the reference token stream)."""
    out = tmp_path_factory.mktemp("one") / "gutenberg"
    tok = prepared_gutenberg / "tokenizer"
    summary = litgpt_mm.data.prepare_gutenberg.prepare(out_dir=str(out), tokenizer_dir=tok, **COMMON)
    return out, summary


def test_two_workers_write_the_one_worker_stream_and_a_killed_run_resumes(
    one_worker, prepared_gutenberg, tmp_path, capsys
):
    ref, summary = one_worker
    tok = prepared_gutenberg / "tokenizer"
    assert summary.documents == {"train": 10, "val": 3} and summary.tokens["train"] == len(shard_tokens(ref / "train"))
    prepare = litgpt_mm.data.prepare_gutenberg.prepare
    two = prepare(out_dir=str(tmp_path / "two"), tokenizer_dir=tok, num_workers=2, **COMMON)
    assert two.workers == 2 and two.tokens == summary.tokens
    for split in ("train", "val"):
        assert torch.equal(shard_tokens(tmp_path / "two" / split), shard_tokens(ref / split)), split

    run = tmp_path / "killed"
    train_books = [line.split("\t")[2] for line in (ref / "books.txt").read_text().splitlines() if line[:5] == "train"]
    killed = run_python(["-c", kill_at_book(train_books[7]), *cli(run, tok)], start_new_session=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run / "train" / "index.json").exists() and (run / "train" / ".checkpoints").is_dir()
    kept = {f.name: f.stat().st_mtime_ns for f in (run / "train").glob("chunk-*.bin")}
    assert kept, "no chunk was finished before the kill"
    cleaned = {f.name: f.stat().st_mtime_ns for f in (run / ".prepare" / "clean").glob("*.json")}
    resumed = run_python(cli(run, tok))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, mtime in kept.items():  # finished chunks and cleaned books are not redone
        assert (run / "train" / name).stat().st_mtime_ns == mtime, name
    assert {f.name: f.stat().st_mtime_ns for f in (run / ".prepare" / "clean").glob("*.json")} == cleaned
    for split in ("train", "val"):
        assert torch.equal(shard_tokens(run / split), shard_tokens(ref / split)), split
    prepare(out_dir=str(run), tokenizer_dir=tok, **COMMON)  # finished: nothing is redone
    assert "train: already written, kept" in capsys.readouterr().out


def test_two_machines_write_one_dataset_to_s3(s3_server, one_worker, prepared_gutenberg, tmp_path):
    ref, _ = one_worker
    tok = prepared_gutenberg / "tokenizer"
    remote.s3_client().create_bucket(Bucket="prep")
    url = "s3://prep/gutenberg"
    common = cli(url, tok, num_nodes=2, work_dir=tmp_path / "shared")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    node1 = subprocess.Popen(  # waits for node 0's manifest, then writes its half and merges the index
        [sys.executable, *common, "--node_rank", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    node0 = run_python([*common, "--node_rank", "0"])
    out1, err1 = node1.communicate(timeout=300)
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, err1[-3000:]
    assert "node 1 merges the index" in node0.stdout and "Wrote s3://prep/gutenberg/train" in out1
    client = remote.s3_client()
    for split in ("train", "val"):
        local = tmp_path / "down" / split
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="prep", Prefix=f"gutenberg/{split}/")["Contents"]]
        for key in keys:
            remote.download(f"s3://prep/{key}", local / key.rsplit("/", 1)[1])
        assert torch.equal(shard_tokens(local), shard_tokens(ref / split)), split
    assert remote.fetch_files(f"{url}/tokenizer", tmp_path / "tok", ("tokenizer.json",)) == ["tokenizer.json"]


def test_bad_settings_give_one_line_before_any_work(s3_server, one_worker, prepared_gutenberg, tmp_path):
    prepare = litgpt_mm.data.prepare_gutenberg.prepare
    ref, _ = one_worker
    tok = prepared_gutenberg / "tokenizer"
    with pytest.raises(ValueError, match=r"other settings \(changed: tokenizer, vocab_size\): pass --overwrite true"):
        prepare(out_dir=str(ref), vocab_size=512, **COMMON)  # another tokenizer on the same shards
    with pytest.raises(ValueError, match="20 workers .* for 13 input"):
        prepare(out_dir=str(tmp_path / "a"), tokenizer_dir=tok, num_workers=20, **COMMON)
    with pytest.raises(ValueError, match="need num_workers >= 1 and 0 <= node_rank < num_nodes"):
        prepare(out_dir=str(tmp_path / "b"), tokenizer_dir=tok, num_nodes=2, node_rank=2, **COMMON)
    assert not (tmp_path / "a" / "train").exists() and not (tmp_path / "b" / "train").exists()
    with pytest.raises(remote.RemoteDataError, match="bucket 'missing' .* does not exist"):
        prepare(out_dir="s3://missing/gutenberg", tokenizer_dir=tok, work_dir=tmp_path / "c", **COMMON)
    assert not (tmp_path / "c").exists()


def test_resuming_on_shards_of_another_tokenizer_is_refused(one_worker, prepared_gutenberg, tmp_path):
    """A checkpoint keeps its tokenizer: resuming it on shards written by another tokenizer stops with one line."""
    from litgpt_mm.config import Config

    check = litgpt_mm.pretrain.check_resume_config
    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_bytes((prepared_gutenberg / "tokenizer" / "tokenizer.json").read_bytes())
    config = Config.from_name("phi-2-moe-tiny")
    check(ckpt, config, prepared_gutenberg / "tokenizer")  # the same tokenizer: accepted
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text().replace('"a"', '"b"', 1))
    with pytest.raises(ValueError, match=r"another tokenizer .* \(tokenizer.json differs\)"):
        check(ckpt, config, other)
