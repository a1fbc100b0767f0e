"""`scripts/gpu_check.py`: a failing path is reported without hiding the others, every path's command (GPU and CPU)
is accepted by its script's parser, and the CPU dry run passes."""

import json
import re
import shutil
import sys

import pytest
from conftest import REPO, run_python, script_command

import litgpt_mm.gpu_check
from litgpt_mm.__main__ import COMMANDS, resolve

# the dry run in CI: one path per stage with the preparations they need (the whole `--device cpu` run takes 3-5 min on
# 2 cores); every path's command is still checked by `test_every_path_command_parses`, and the benchmarks' numbers by
# `test_benchmark_numbers_are_read_from_the_committed_results`
DRY_RUN = "align_cache,generate_batch"  # the recipes themselves are tested in their own files


@pytest.fixture(scope="module")
def gpu_check():
    return litgpt_mm.gpu_check


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_path_is_reported_and_does_not_hide_the_others(gpu_check, tmp_path):
    Check = gpu_check.Check
    selected = [
        Check("broken", "exits 1", py("import sys; print('half way'); sys.exit('error: broken on purpose')")),
        Check("fine", "prints", py("print('fine')"), key=lambda out, log: "said " + log.split()[-1]),
        Check("after_broken", "needs broken", py("pass"), needs=("broken",)),
        Check("hangs", "sleeps", py("import time; time.sleep(60)"), timeout=1.0),
        Check("no_artefact", "exits 0 but writes nothing", py("pass"), key=gpu_check.train_key("no_artefact")),
        Check("later", "prints", py("print('later')")),
        Check("no_flag", "cannot run", py("pass"), skip="unsupported: the recipe has no such flag"),
    ]
    out, results = tmp_path / "out", tmp_path / "results"
    status = gpu_check.check_all(selected, out, results, "cpu", jobs=2, argv=["gpu_check.py", "--device", "cpu"])
    assert status == 1
    report = json.loads((results / "gpu_check_cpu.json").read_text())
    got = {p["name"]: (p["status"], p["result"]) for p in report["paths"]}
    assert got["broken"] == ("fail", "exit 1: error: broken on purpose")
    assert got["fine"] == ("pass", "said fine") and got["later"] == ("pass", "")
    assert got["after_broken"] == ("skip", "needs broken, which did not pass")
    assert got["hangs"] == ("fail", "timeout after 1 s")
    assert got["no_artefact"] == ("fail", "exit 0 but no final/ checkpoint")
    assert got["no_flag"] == ("unsupported", "the recipe has no such flag")
    assert report["counts"] == {"pass": 2, "fail": 3, "skip": 1, "unsupported": 1}
    assert "half way" in (out / "logs" / "broken.log").read_text()
    md = (results / "gpu_check_cpu.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (?:pass|fail|skip|unsupported) \|", md, re.M)
    assert rows == [c.name for c in selected]


def test_only_adds_what_a_path_needs_and_rejects_unknown_names(gpu_check, tmp_path, capsys):
    all_checks = gpu_check.checks("cpu", tmp_path)
    picked = [c.name for c in gpu_check.select(all_checks, "generate_nf4,qlora_standard")]
    assert picked == ["prepare_gutenberg", "prepare_llava", "prepare_checkpoints", "qlora_standard", "generate_nf4"]
    with pytest.raises(ValueError, match="--only qlora: unknown path"):
        gpu_check.select(all_checks, "qlora")
    assert gpu_check.main(device="cpu", only="generate_nf4", list=True, out_dir=tmp_path) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["prepare_gutenberg", "prepare_checkpoints", "generate_nf4"]


@pytest.mark.parametrize("name", ["moe_layer", "train_step", "instruct", "generate", "align"])
def test_benchmark_numbers_are_read_from_the_committed_results(gpu_check, tmp_path, name):
    results = tmp_path / f"bench_{name}" / "results"
    results.mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "results" / f"{name}_cpu.json", results)
    key = {c.name: c.key for c in gpu_check.checks("cpu", tmp_path)}[f"bench_{name}"]
    assert re.search(r"\d\.\d", key(tmp_path, ""))


def test_scale_out_numbers_are_read_from_the_committed_results(gpu_check, tmp_path):
    (tmp_path / "scale_out_fsdp_ep").mkdir()
    shutil.copy(REPO / "benchmarks" / "results" / "scale_out_cpu.json", tmp_path / "scale_out_fsdp_ep")
    key = gpu_check.scale_out_key(tmp_path, "")
    assert re.search(r"micro-batch 4: fsdp \d+ ms vs fsdp_ep2 \d+ ms, all-to-all \d+%", key), key


def _scale_out_rank(rank: int, port: int, argv: list[str]) -> None:
    import os
    import runpy

    import torch

    torch.set_num_threads(1)  # a forked child: the parent's OpenMP pool is not its own
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")  # `python benchmarks/scale_out.py <args>`, in this rank


def test_scale_out_runs_on_two_processes_and_is_skipped_on_one_gpu(gpu_check, tmp_path):
    """The multi-GPU path skips with fewer than 2 GPUs; its CPU command (2 gloo processes, forked here rather than
    started by torchrun, which would import everything twice more) times FSDP and FSDP + expert parallelism."""
    import socket

    import torch.multiprocessing as mp

    (one,) = [c for c in gpu_check.checks("cuda", tmp_path, 1) if c.name == "scale_out_fsdp_ep"]
    assert one.skip.startswith("skip: fewer than 2 GPUs")
    (four,) = [c for c in gpu_check.checks("cuda", tmp_path, 4) if c.name == "scale_out_fsdp_ep"]
    assert not four.skip and four.argv[four.argv.index("--nproc_per_node") + 1] == "4"
    (check,) = [c for c in gpu_check.checks("cpu", tmp_path) if c.name == "scale_out_fsdp_ep"]
    script, args = command(check.argv)
    assert check.argv[check.argv.index("--nproc_per_node") + 1] == "2"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_scale_out_rank, args=(port, [script, *args]), nprocs=2, start_method="fork")
    rows = json.loads((tmp_path / "scale_out_fsdp_ep" / "scale_out_cpu.json").read_text())["rows"]
    assert [(r["variant"], r["micro_batch"]) for r in rows] == [(v, b) for b in (1, 4) for v in ("fsdp", "fsdp_ep2")]
    assert all((r["a2a_share"] > 0) == (r["variant"] == "fsdp_ep2") for r in rows)
    assert "all-to-all" in gpu_check.scale_out_key(tmp_path, "")


@pytest.mark.parametrize("auto_gib, met, advice", [(8.0, "met", "keep `true`"), (11.0, "NOT met", "make `false`")])
def test_peak_memory_decides_the_decode_dequantized_advice(gpu_check, tmp_path, auto_gib, met, advice):
    rows = [
        {"variant": "standard", "x_of_standard": 1.0, "peak_GiB": 6.0},
        {"variant": "ours_p0.9", "x_of_standard": 1.9, "peak_GiB": auto_gib},
    ]
    results = tmp_path / "bench_instruct" / "results"
    results.mkdir(parents=True)
    (results / "instruct_h100.json").write_text(json.dumps({"rows": rows, "notes": []}))
    assert f"(<= 10 GB: {met})" in gpu_check.instruct_key(tmp_path, "")
    assert advice in gpu_check.decode_dequantized_advice(tmp_path)


def command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script, its arguments) of a path's command, or None for a helper of gpu_check itself."""
    if argv[0] == "env":  # a benchmark with its results redirected: env <VAR>=<dir> python <script> <args>
        argv = argv[2:]
    if argv[1:3] == ["-m", "torch.distributed.run"]:  # -m torch.distributed.run <launcher flags> <script> <args>
        i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        return argv[i], argv[i + 1 :]
    if argv[1] != "-c":
        return argv[1], argv[2:]
    if "kill_and_resume" in argv[2]:  # -c <code> <out_dir> <script> <args>
        return argv[4], [*argv[5:], "--out_dir", argv[3]]
    return None


def test_every_path_command_parses(gpu_check, tmp_path, monkeypatch):
    """Both devices' commands, the GPU ones included, use only flags and values their scripts accept."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    monkeypatch.chdir(REPO)
    parsed = 0
    for device, n_gpus in (("cuda", 2), ("cpu", 0)):
        for check in gpu_check.checks(device, tmp_path, n_gpus):
            assert not check.skip or re.match(r"(skip|unsupported): \S", check.skip), check.skip
            cmd = command(check.argv)
            if cmd is None:
                continue
            script, args = cmd
            source = (REPO / script).read_text()
            if script.startswith("benchmarks/"):  # argparse: its flags must exist
                flags = set(re.findall(r'add_argument\(\s*"(--\w+)"', source))
                assert {a for a in args if a.startswith("--")} <= flags, (check.name, device)
                continue
            function = resolve(COMMANDS[script_command(script)[0]])
            for name in script_command(script)[1:]:
                function = function[name]
            if isinstance(function, dict):  # a group: the first argument names the subcommand
                function, args = function[args[0]], args[1:]
            parser = ArgumentParser(exit_on_error=False)
            parser.add_argument("--config", action=ActionConfigFile)
            parser.add_function_arguments(function, fail_untyped=False)
            parser.parse_args(args)
            parsed += 1
    assert parsed >= 30


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    """`scripts/gpu_check.py --device cpu` on a subset: every path that runs passes, and the table has each path."""
    out, results = tmp_path / "out", tmp_path / "results"
    args = ["scripts/gpu_check.py", "--device", "cpu", "--only", DRY_RUN, "--out_dir", str(out)]
    proc = run_python([*args, "--results_dir", str(results)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((results / "gpu_check_cpu.json").read_text())
    names = [p["name"] for p in report["paths"]]
    assert set(DRY_RUN.split(",")) <= set(names) and "prepare_checkpoints" in names
    assert all(p["status"] == "pass" for p in report["paths"]), report["paths"]
    assert all(p["result"] for p in report["paths"])  # every path has its key number
    md = (results / "gpu_check_cpu.md").read_text()
    assert all(f"| {name} | pass |" in md for name in names)
