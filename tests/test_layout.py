"""The layout page (`docs/layout.md`) against the package, and the rules of the layout: stage code inside
`litgpt_mm`, no edits of the import path and no imports by file path, one `litgpt-mm` command whose subcommands are
the scripts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, script_command

from litgpt_mm.__main__ import COMMANDS, resolve

LAYOUT = (REPO / "docs" / "layout.md").read_text()


def test_every_module_has_a_row_and_every_row_exists():
    named = set(re.findall(r"`(litgpt_mm/[\w/]+(?:\.py)?/?)`", LAYOUT))
    modules = {
        str(p.relative_to(REPO))
        for p in (REPO / "litgpt_mm").rglob("*.py")
        if p.name != "__init__.py" and "remote_code" not in p.parts
    }
    data_folders = {"litgpt_mm/models/clip_configs/", "litgpt_mm/export/remote_code/"}
    missing = (modules | data_folders) - named
    assert not missing, f"docs/layout.md has no row for {sorted(missing)}"
    stale = [n for n in named if not (REPO / n).exists()]
    assert not stale, f"docs/layout.md names paths that do not exist: {stale}"


def test_no_import_path_edits_or_imports_by_file_path():
    sources = [
        p
        for d in ("litgpt_mm", "recipes", "scripts", "generate", "benchmarks", "xla", "reports")
        for p in (REPO / d).rglob("*.py")
    ]
    offenders = [
        str(p.relative_to(REPO))
        for p in sources
        if re.search(r"sys\.path\.(insert|append)|spec_from_file_location|runpy\.run_path", p.read_text())
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "script",
    sorted(
        str(p.relative_to(REPO))
        for p in [*REPO.glob("recipes/*.py"), *REPO.glob("scripts/*.py"), REPO / "generate" / "mm.py"]
        if "run_command(" in p.read_text()
    ),
)
def test_every_entry_script_is_a_few_lines_calling_its_subcommand(script):
    text = (REPO / script).read_text()
    assert len(text.splitlines()) <= 15, f"{script} holds code: it belongs in litgpt_mm"
    path = script_command(script)
    spec = COMMANDS
    for name in path:
        spec = spec[name]
    assert callable(resolve(spec)) or isinstance(spec, dict)


def test_litgpt_mm_help_lists_every_stage():
    proc = subprocess.run([sys.executable, "-m", "litgpt_mm", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = re.search(r"\{([\w,-]+)\}", proc.stdout)[1].split(",")
    assert listed == list(COMMANDS)
    for stage in (
        "pretrain",
        "align",
        "finetune",
        "generate",
        "chat",
        "serve",
        "evaluate",
        "export",
        "prepare",
        "compare",
        "capacity",
        "gpu-check",
    ):
        assert stage in listed


def test_a_subcommand_help_is_its_script_help():
    def options(args: list[str]) -> list[str]:
        proc = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return re.findall(r"^\s+(--[\w.]+)", proc.stdout, flags=re.M)

    script = options(["scripts/prepare_shapes.py"])
    assert script and script == options(["-m", "litgpt_mm", "prepare", "shapes"])


def test_the_console_script_is_installed():
    """`[project.scripts] litgpt-mm` (pip install -e . writes it beside the interpreter)."""
    script = Path(sys.executable).parent / "litgpt-mm"
    assert script.is_file(), "reinstall the package (make install) to get the litgpt-mm command"
    proc = subprocess.run([str(script), "prepare", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in ("gutenberg", "coco", "llava_instruct", "redpajama", "shapes"))
