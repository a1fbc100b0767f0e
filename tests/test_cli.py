"""Bad input at the command line: one `error:` line naming what is wrong, exit status 2, no traceback."""

import pytest
from conftest import DATA, REPO

import litgpt_mm.align
import litgpt_mm.data.prepare_coco
import litgpt_mm.data.prepare_shapes
import litgpt_mm.finetune.qlora
import litgpt_mm.generate
from litgpt_mm.cli import run_cli


def _error_of(capsys, fn, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(fn, args=args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # the last two lines: the error and the hint (Lightning may log to a stream an earlier test's capture closed)
    assert lines[-2].startswith("error: ") and "LITGPT_MM_DEBUG=1" in lines[-1]
    return lines[-2]


def test_generate_names_a_missing_checkpoint_directory(capsys, tmp_path):
    main = litgpt_mm.generate.main
    line = _error_of(capsys, main, ["--checkpoint_dir", str(tmp_path / "nope"), "--prompt", "hi"])
    assert f"checkpoint directory {tmp_path / 'nope'} does not exist" in line
    line = _error_of(capsys, main, ["--checkpoint_dir", str(tmp_path), "--prompt", "hi"])
    assert f"{tmp_path} is not a multimodal checkpoint (no multimodal_config.yaml)" in line


def test_generate_names_a_corrupt_or_missing_image(capsys, tmp_path, checkpoints):
    main = litgpt_mm.generate.main
    corrupt = tmp_path / "photo.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    base = ["--checkpoint_dir", str(checkpoints["merged"]), "--prompt", "What is it?", "--device", "cpu"]
    line = _error_of(capsys, main, [*base, "--image", str(corrupt)])
    assert f"image {corrupt}: cannot be decoded (" in line and "pass a JPEG" in line
    line = _error_of(capsys, main, [*base, "--image", str(tmp_path / "missing.png")])
    assert f"image {tmp_path / 'missing.png'}: no such file" in line


def test_prepare_script_reports_a_bad_annotation_file(capsys, tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text("{not json")
    (tmp_path / "annotations" / "captions_val2017.json").write_text("{}")
    prepare = litgpt_mm.data.prepare_coco.prepare
    line = _error_of(capsys, prepare, ["--source_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    assert "captions_train2017.json: not a COCO captions file" in line


def test_debug_variable_lets_the_exception_through(capsys, tmp_path, monkeypatch):
    main = litgpt_mm.generate.main
    args = ["--checkpoint_dir", str(tmp_path / "nope"), "--prompt", "hi"]
    assert _error_of(capsys, main, args).startswith("error: checkpoint directory")
    monkeypatch.setenv("LITGPT_MM_DEBUG", "1")  # Python then prints the traceback and exits with status 1
    with pytest.raises(FileNotFoundError, match="nope"):
        run_cli(main, args=args)


def test_a_recipe_refuses_a_missing_data_directory(capsys, tmp_path):
    setup = litgpt_mm.align.setup
    missing = tmp_path / "no-coco"
    line = _error_of(capsys, setup, ["--data_dir", str(missing), "--lm_checkpoint_dir", str(DATA)])
    assert str(missing) in line or str(DATA) in line


def test_a_script_exit_message_is_one_error_line(capsys, tmp_path):
    prepare = litgpt_mm.data.prepare_shapes.prepare
    line = _error_of(capsys, prepare, ["--out_dir", str(tmp_path / "w"), "--max_shapes", "99"])
    assert line.startswith("error: --max_shapes must be between 1 and")


def test_set_up_time_counts_from_the_start_of_the_command(monkeypatch):
    """The first command of a process counts from the process start (imports included); a later one in the same
    process (`scripts/demo.py` runs every stage in one) from its own start."""
    import time

    import psutil

    from litgpt_mm import cli

    def noop() -> None:
        """Nothing."""

    monkeypatch.setattr(cli, "_command_start", None)
    run_cli(noop, args=[])
    assert cli.command_started() == psutil.Process().create_time()
    before = time.time()
    run_cli(noop, args=[])
    assert before <= cli.command_started() <= time.time()


def test_optimizer_overrides_after_a_config_reach_the_optimizer():
    """`--optimizer.init_args.lr` after a `--config`: jsonargparse leaves a stray `lr: "3e-3"` beside `init_args`,
    which litgpt's `instantiate_torch_optimizer` would silently ignore; `optimizer_spec` folds it in."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from litgpt_mm.training.loop import optimizer_spec

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(litgpt_mm.finetune.qlora.setup, fail_untyped=False)
    args = ["--config", str(REPO / "recipes/configs/qlora_instruct_tiny.yaml"), "--optimizer.init_args.lr", "3e-3",
            "--optimizer.init_args.betas", "[0.9, 0.99]"]  # fmt: skip
    spec = optimizer_spec(parser.parse_args(args).optimizer)
    assert spec["init_args"]["lr"] == 3e-3 and spec["init_args"]["betas"] == [0.9, 0.99]
    assert spec["class_path"] == "bitsandbytes.optim.PagedAdamW8bit" and set(spec) == {"class_path", "init_args"}
    assert optimizer_spec("AdamW") == "AdamW"
    with pytest.raises(ValueError, match="no class_path"):
        optimizer_spec({"lr": "3e-3"})  # what `--optimizer AdamW --optimizer.init_args.lr 3e-3` parses into
