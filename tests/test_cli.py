"""Bad input at the command line: one `error:` line naming what is wrong, exit status 2, no traceback."""

import pytest
from conftest import DATA, load_script, run_python

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
    main = load_script("generate/mm.py").main
    line = _error_of(capsys, main, ["--checkpoint_dir", str(tmp_path / "nope"), "--prompt", "hi"])
    assert f"checkpoint directory {tmp_path / 'nope'} does not exist" in line
    line = _error_of(capsys, main, ["--checkpoint_dir", str(tmp_path), "--prompt", "hi"])
    assert f"{tmp_path} is not a multimodal checkpoint (no multimodal_config.yaml)" in line


def test_generate_names_a_corrupt_or_missing_image(capsys, tmp_path, checkpoints):
    main = load_script("generate/mm.py").main
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
    prepare = load_script("scripts/prepare_coco.py").prepare
    line = _error_of(capsys, prepare, ["--source_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    assert "captions_train2017.json: not a COCO captions file" in line


def test_debug_variable_shows_the_traceback_and_the_exit_status_is_two(tmp_path):
    args = ["generate/mm.py", "--checkpoint_dir", str(tmp_path / "nope"), "--prompt", "hi"]
    quiet = run_python(args, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith("error: checkpoint directory")
    loud = run_python(args, timeout=300, env={"LITGPT_MM_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "FileNotFoundError" in loud.stderr


def test_a_recipe_refuses_a_missing_data_directory(capsys, tmp_path):
    setup = load_script("recipes/align.py").setup
    missing = tmp_path / "no-coco"
    line = _error_of(capsys, setup, ["--data_dir", str(missing), "--lm_checkpoint_dir", str(DATA)])
    assert str(missing) in line or str(DATA) in line
