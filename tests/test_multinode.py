"""Two "nodes" on one machine: `torchrun --nnodes 2` (one gloo process each, loopback rendezvous) trains the same
curve as one process with the same global batch, and a SIGKILL of one node followed by `--resume auto` on both
continues that curve."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    SHORT_RUN,
    THREADS,
    assert_rows_close,
    kill_while_saving,
    pretrain_args,
    read_log,
    run_recipe_here,
)

import litgpt_mm.pretrain
from litgpt_mm.config import Config
from litgpt_mm.training.checkpoint import save_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], node1_script: list[str] | None = None, timeout: float = 300) -> list:
    """Start `args` (a recipe command line) as two torchrun nodes of one process each; return both results."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONHASHSEED": "0"}
    procs = []
    for rank in (0, 1):
        script = node1_script if rank == 1 and node1_script else []
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "--max_restarts", "0", *script, *args, "--devices", "1", "--num_nodes", "2"]  # fmt: skip
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return results


def test_torchrun_two_nodes_follow_one_process_and_resume_after_one_node_is_killed(prepared_gutenberg, tmp_path, capfd):
    config = Config.from_name("phi-2-moe-tiny", moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0)
    save_config(config, tmp_path)
    settings = {"model_config": tmp_path / "model_config.yaml", **SHORT_RUN}
    ref = run_recipe_here(capfd, pretrain_args(prepared_gutenberg, tmp_path / "one", **settings))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = pretrain_args(prepared_gutenberg, tmp_path / "two", **settings)
    wrapper = tmp_path / "die.py"
    wrapper.write_text(kill_while_saving("step-000008", torn=False))
    killed = two_nodes(run, node1_script=[str(wrapper)])
    assert killed[1][0] != 0 and killed[0][0] != 0, killed  # node 1 killed; node 0 loses its peer and stops
    assert not (tmp_path / "two" / "final").exists()
    resumed = two_nodes([*run, "--resume", "auto"])
    assert all(code == 0 for code, _, _ in resumed), [err[-3000:] for _, _, err in resumed]
    assert "Resumed from" in resumed[0][1]
    want, got = (read_log(tmp_path / d / "logs" / "train_log.csv") for d in ("one", "two"))
    assert_rows_close(got, want, ("loss", "tokens", "lr"))
    one, two = (torch.load(tmp_path / d / "final" / "lit_model.pth")["model"] for d in ("one", "two"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    # validation is not compared: each node evaluates its own share of the validation blocks


def test_num_nodes_without_a_launcher_is_one_line(prepared_gutenberg, tmp_path):
    setup = litgpt_mm.pretrain.setup
    with pytest.raises(ValueError, match="--num_nodes 2 needs a launcher on every node: start the same command"):
        setup(model_name="phi-2-moe-tiny", data_dir=prepared_gutenberg, out_dir=tmp_path / "x", num_nodes=2)
    assert not (tmp_path / "x").exists()


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "LSB_JOBID"):
        monkeypatch.delenv(key, raising=False)
