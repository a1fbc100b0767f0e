"""Every GPU code path of the project in one offline run: random weights, bundled data, one process per path.

    python scripts/gpu_check.py                # or: make gpu-check (a CUDA machine; target <= 9 min on one H100)
    python scripts/gpu_check.py --device cpu   # the dry run: the same paths with tiny sizes in fp32 (a CI test)
    python scripts/gpu_check.py --list         # the paths, what each runs, and why some are not run
    python scripts/gpu_check.py --only qlora_standard,generate_nf4   # some paths (with the paths they need)

Each path (`checks` lists them as data: name, what it runs, its command) runs in its own process with a timeout,
its output in `<out_dir>/logs/<path>.log`, so one failure does not hide the others; a path whose inputs failed is
skipped with that reason. The paths: data preparation (the bundled Gutenberg books, COCO sample and LLaVA rows;
random-weight tiny LMs, projectors and a merged model), tiny MoE pretraining (`--compile`, activation checkpointing,
8-bit AdamW, several devices, a SIGKILL mid-run resumed with `--resume auto`), alignment with CLIP on the device
(feature cache off and on), QLoRA (nf4, paged 8-bit AdamW, both methods, merge, Hugging Face export),
`generate/mm.py` (bf16, nf4, batch mode), the benchmarks at the Phi-2 shape (their JSON goes to
`<out_dir>/bench_<name>/results/`, never over the committed results), and the multi-GPU section: `phi-2-moe` under
FSDP and FSDP + expert parallelism over every visible GPU (`torchrun`; skipped on one GPU). The table (path |
status | seconds | result) is printed and written to `<results_dir>/gpu_check_<device>.md` and `.json`; the exit
status is 1 if a path failed.

On a CPU (`--device cpu`) the precision is `32-true` instead of `bf16-mixed`, the benchmarks run at tiny sizes, and a
path that cannot run there says why (status `skip`). A path that the code cannot run on this machine has the status
`unsupported`, with what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from litgpt_mm import REPO_ROOT as ROOT

# where `analysis.bench` writes its result files (default: `benchmarks/results/`)
RESULTS_ENV = "LITGPT_MM_BENCH_RESULTS"
BUNDLED_IMAGES = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "waterview.jpg"]
# tiny sizes on each device: the paths exercise code, they do not train anything useful
SIZES = {
    "cpu": dict(
        steps=4,
        micro=4,
        seq=64,
        resume_steps=40,
        resume_every=5,
        align_micro=4,
        instruct_steps=4,
        instruct_micro=2,
        new_tokens=8,
    ),
    "cuda": dict(
        steps=20,
        micro=8,
        seq=128,
        resume_steps=200,
        resume_every=20,
        align_micro=8,
        instruct_steps=12,
        instruct_micro=4,
        new_tokens=32,
    ),
}
MEMORY_TARGET_GB = 10.0  # QLoRA at sequence 1024, micro-batch 4, checkpointing (benchmarks/instruct.py)


class CheckFailed(Exception):
    """A path exited 0 but did not produce what it should have."""


@dataclass
class Check:
    """One path: a command run from the repo root in its own process.

    Attributes:
        name: short id (`--only` takes these).
        what: what the path runs on this device, one line.
        argv: the command, interpreter first.
        needs: paths whose output this one reads (run first; their failure skips this one).
        skip: when set, the path is not run: `skip: <why>` or `unsupported: <what is missing>`.
        key: reads the path's key number from its work directory and log; raises `CheckFailed`.
        timeout: seconds before the process group is killed.
        exclusive: runs alone (the benchmarks on a GPU, so that nothing else shares the device).
    """

    name: str
    what: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    skip: str = ""
    key: Callable[[Path, str], str] | None = None
    timeout: float = 420.0
    exclusive: bool = False

    def __post_init__(self) -> None:
        self.argv = [str(a) for a in self.argv]


@dataclass
class Result:
    name: str
    status: str  # pass, fail, skip, unsupported
    seconds: float = 0.0
    result: str = ""
    log: str = ""
    notes: list[str] = field(default_factory=list)


def python(*args: object) -> list[str]:
    return [sys.executable, *map(str, args)]


def call(function: str, *args: object) -> list[str]:
    """The command that runs `gpu_check.<function>(*args)` in a fresh interpreter."""
    code = f"import sys; from litgpt_mm import gpu_check; gpu_check.{function}(*sys.argv[1:])"
    return python("-c", code, *args)


def bench(script: str, out: Path, *args: object) -> list[str]:
    """The command that runs `benchmarks/<script>` with its result files redirected to `out` (the committed
    `benchmarks/results/` stay untouched)."""
    return ["env", f"{RESULTS_ENV}={out}", *python(f"benchmarks/{script}", *args)]


def checks(device: str, out_dir: Path, n_gpus: int = 1) -> list[Check]:
    """The paths for `device` (`cuda` or `cpu`), working under `out_dir`, in the order they are reported."""
    return [
        *_prepare_checks(out_dir),
        *_pretrain_checks(device, out_dir, n_gpus),
        *_multimodal_checks(device, out_dir),
        *_bench_checks(device, out_dir),
        *_scale_out_checks(device, out_dir, n_gpus),
    ]


def _prepare_checks(out: Path) -> list[Check]:
    books, ckpt = out / "prepare_gutenberg", out / "prepare_checkpoints"
    return [
        Check("prepare_gutenberg", "the 13 bundled books: cleaning, a 1,024-token BPE, token shards",
              python("scripts/prepare_gutenberg.py", "--vocab_size", 1024, "--out_dir", books), key=gutenberg_key),
        Check("prepare_coco", "the bundled COCO sample (captions index, no feature cache)",
              python("scripts/prepare_coco.py", "--out_dir", out / "prepare_coco"), key=summary_key("prepare_coco")),
        Check("prepare_llava", "the bundled LLaVA-Bench rows on bundled photos, Phi-2 template",
              python("scripts/prepare_llava_instruct.py", "--tokenizer_dir", books / "tokenizer",
                     "--map_missing_to", ROOT / "data" / "coco" / "val2017", "--max_tokens", 160,
                     "--val_fraction", 0.2, "--out_dir", out / "prepare_llava"), needs=("prepare_gutenberg",),
              key=summary_key("prepare_llava")),
        Check("prepare_checkpoints", "random-weight tiny LMs (MoE, dense), projectors on random-init CLIP, a merged "
              "model with LoRA folded in, batch prompts",
              call("make_checkpoints", books / "tokenizer", ckpt), needs=("prepare_gutenberg",), key=checkpoints_key),
    ]  # fmt: skip


def _pretrain_args(device: str, out: Path, steps: int | None = None, save_every: int | None = None) -> list[str]:
    s = SIZES[device]
    steps = steps or s["steps"]
    return python(
        "recipes/pretrain_moe.py", "--config", "recipes/configs/pretrain_moe_tiny.yaml",
        "--data_dir", out / "prepare_gutenberg", "--precision", precision(device), "--num_workers", 0,
        "--train.max_steps", steps, "--train.save_interval", save_every or steps, "--train.log_interval", 1,
        "--train.micro_batch_size", s["micro"], "--train.global_batch_size", 2 * s["micro"],
        "--train.max_seq_length", s["seq"], "--train.lr_warmup_steps", 1,
        "--eval.interval", steps, "--eval.max_iters", 2, "--eval.initial_validation", "false",
    )  # fmt: skip


def _pretrain_checks(device: str, out: Path, n_gpus: int) -> list[Check]:
    cuda, p = device == "cuda", precision(device)
    need = ("prepare_gutenberg",)
    names = ("compile", "checkpointing", "adamw8bit", "fsdp")
    run = {n: [*_pretrain_args(device, out), "--out_dir", out / f"pretrain_{n}"] for n in names}
    if cuda:
        multi = f"FSDP (FULL_SHARD, --strategy fsdp) over {n_gpus} GPU(s), {p}"
        no_fsdp, devices, fsdp_flag = "", n_gpus, ["--strategy", "fsdp"]
    else:
        multi, no_fsdp, devices = "DDP over gloo, 2 processes (the recipe's CPU strategy for several devices)", "", 2
        fsdp_flag = []
    no_compile = (
        ""
        if cuda
        else (
            "skip: CPU dry run: inductor takes ~45 s even for the tiny dense model on 2 cores "
            "(tests/models/test_moe.py traces the MoE's CPU expert path with dynamo instead)"
        )
    )
    resume = _pretrain_args(device, out, SIZES[device]["resume_steps"], SIZES[device]["resume_every"])
    return [
        Check("pretrain_compile", f"tiny MoE pretraining, {p}, --compile true", [*run["compile"], "--compile", "true"],
              need, no_compile, train_key("pretrain_compile")),
        Check("pretrain_checkpointing", f"tiny MoE pretraining, {p}, --activation_checkpointing true",
              [*run["checkpointing"], "--activation_checkpointing", "true"], need,
              key=train_key("pretrain_checkpointing")),
        Check("pretrain_adamw8bit", f"tiny MoE pretraining, {p}, bitsandbytes.optim.AdamW8bit",
              [*run["adamw8bit"], "--optimizer", "bitsandbytes.optim.AdamW8bit"], need,
              key=train_key("pretrain_adamw8bit")),
        Check("pretrain_fsdp", f"tiny MoE pretraining, {multi}",
              [*run["fsdp"], *fsdp_flag, "--devices", devices,
               "--train.global_batch_size", devices * SIZES[device]["micro"]],
              need, no_fsdp, train_key("pretrain_fsdp")),
        Check("pretrain_kill_resume", f"tiny MoE pretraining, {p}: SIGKILL after its first checkpoint, rerun with "
              "--resume auto to the end", call("kill_and_resume", out / "pretrain_kill_resume", *resume[1:]), need,
              key=resume_key),
    ]  # fmt: skip


def _multimodal_checks(device: str, out: Path) -> list[Check]:
    s, p, cuda = SIZES[device], precision(device), device == "cuda"
    ckpt = out / "prepare_checkpoints"
    align = [
        "recipes/align.py", "--config", "recipes/configs/align_tiny.yaml", "--lm_checkpoint_dir", ckpt / "lm_moe",
        "--data_dir", out / "prepare_coco", "--precision", p, "--num_workers", 0, "--train.max_steps", s["steps"],
        "--train.save_interval", s["steps"], "--train.log_interval", 1, "--train.micro_batch_size", s["align_micro"],
        "--train.global_batch_size", s["align_micro"], "--train.lr_warmup_steps", 1, "--eval.interval", s["steps"],
        "--eval.max_iters", 1, "--eval.initial_validation", "false", "--eval.max_new_tokens", 4,
        "--num_sample_images", 1,
    ]  # fmt: skip
    steps = s["instruct_steps"]
    instruct = [
        "recipes/qlora_instruct.py", "--config", "recipes/configs/qlora_instruct_tiny.yaml", "--data_dir",
        out / "prepare_llava", "--precision", p, "--train.max_steps", steps, "--train.save_interval", steps,
        "--train.log_interval", 1, "--train.micro_batch_size", s["instruct_micro"], "--train.global_batch_size",
        2 * s["instruct_micro"], "--train.lr_warmup_steps", 1, "--eval.interval", steps, "--eval.max_iters", 1,
        "--eval.initial_validation", "false",
    ]  # fmt: skip
    gen = ["generate/mm.py", "--checkpoint_dir", ckpt / "merged", "--device", device,
           "--max_new_tokens", s["new_tokens"], "--stream", "false"]  # fmt: skip
    image = ["--image", ROOT / "data" / "images" / BUNDLED_IMAGES[0], "--prompt", "What is in the picture?"]
    nf4 = "nf4 through bitsandbytes' CUDA kernels" if cuda else "nf4 (bitsandbytes' CPU kernels)"
    dtype = "bf16" if cuda else "fp32"
    clip = "CLIP ViT-B/32 (random init) on the GPU" if cuda else "CLIP ViT-B/32 (random init) on the CPU"
    a_need, q_need = ("prepare_coco", "prepare_checkpoints"), ("prepare_llava", "prepare_checkpoints")
    return [
        Check("align_no_cache", f"alignment on the tiny MoE LM, {p}, {clip} every step (--feature_cache false)",
              python(*align, "--feature_cache", "false", "--feature_dir", out / "align_no_cache" / "features",
                     "--out_dir", out / "align_no_cache"), a_need,
              key=train_key("align_no_cache")),
        Check("align_cache", f"alignment on the tiny MoE LM, {p}, {clip} filling the feature cache, then reading it",
              python(*align, "--feature_cache", "true", "--feature_dir", out / "align_cache" / "features",
                     "--out_dir", out / "align_cache"), a_need, key=train_key("align_cache")),
        Check("qlora_standard", f"QLoRA --method standard on the tiny dense Phi, {p}, {nf4}, PagedAdamW8bit, "
              "merge + Hugging Face export",
              python(*instruct, "--align_dir", ckpt / "align_dense", "--method", "standard", "--feature_dir",
                     out / "qlora_standard" / "features", "--out_dir", out / "qlora_standard"), q_need,
              key=qlora_key("qlora_standard", hf=True)),
        Check("qlora_autoregressive", f"QLoRA --method autoregressive (p 1 -> 0.8, --lookahead 2, checkpointing) "
              f"on the tiny MoE, {p}, {nf4}, PagedAdamW8bit, merge",
              python(*instruct, "--align_dir", ckpt / "align_moe", "--method", "autoregressive", "--p_end", 0.8,
                     "--lookahead", 2, "--activation_checkpointing", "true", "--feature_dir",
                     out / "qlora_autoregressive" / "features", "--out_dir", out / "qlora_autoregressive"), q_need,
              key=qlora_key("qlora_autoregressive", hf=False)),
        Check("generate", f"generate/mm.py on the merged tiny MoE, {dtype}, "
              "one image", python(*gen, *image), ("prepare_checkpoints",), key=generate_key),
        Check("generate_nf4", f"generate/mm.py --quantize nf4, {nf4}", python(*gen, *image, "--quantize", "nf4"),
              ("prepare_checkpoints",), key=generate_key),
        Check("generate_batch", f"generate/mm.py batch mode, {dtype}: 6 prompts (5 images, 1 text-only), batch 4",
              python(*gen, "--input", ckpt / "prompts.jsonl", "--output", out / "generate_batch" / "answers.jsonl",
                     "--batch_size", 4), ("prepare_checkpoints",), key=batch_key),
    ]  # fmt: skip


def _bench_checks(device: str, out: Path) -> list[Check]:
    cuda = device == "cuda"
    res = {n: out / f"bench_{n}" / "results" for n in ("moe_layer", "train_step", "instruct", "generate", "align")}
    if cuda:
        args = {
            "moe_layer": ["--device", "cuda"],
            "train_step": ["--device", "cuda", "--n_layer", 32, "--compile", "--iters", 3],
            "instruct": ["--device", "cuda", "--lm", "phi-2", "--n_layer", 32, "--n_embd", 2560, "--vocab_size", 51200,
                         "--prompt_tokens", 462, "--answer_tokens", 512, "--checkpointing", 1, "--capstone", 0,
                         "--iters", 2],
            "generate": ["--device", "cuda", "--n_layer", 32, "--n_embd", 2560, "--new_tokens", 128, "--iters", 3],
            "align": ["--device", "cuda", "--lm", "phi-2", "--iters", 3],
        }  # fmt: skip
        shape = "Phi-2 shape, bf16"
    else:
        args = {
            "moe_layer": ["--tokens", 256, "--n_embd", 64, "--iters", 2],
            "train_step": ["--n_layer", 1, "--n_embd", 80, "--seq_len", 32, "--batch", 2, "--iters", 1],
            "instruct": ["--lm", "phi-2", "--n_layer", 1, "--n_embd", 80, "--vocab_size", 256, "--prompt_tokens", 8,
                         "--answer_tokens", 8, "--checkpointing", 1, "--capstone", 0, "--iters", 1],
            "generate": ["--n_layer", 1, "--n_embd", 80, "--new_tokens", 4, "--prompt_tokens", 4, "--iters", 1],
            "align": ["--batch", 2, "--caption_tokens", 8, "--iters", 1],
        }  # fmt: skip
        shape = "tiny sizes, fp32"
    train_step = "with and without torch.compile" if cuda else "without compile (CPU dry run)"

    def make(name: str, what: str, key: Callable[[Path, str], str], skip: str = "") -> Check:
        return Check(
            f"bench_{name}",
            f"benchmarks/{name}.py, {what} ({shape})",
            bench(f"{name}.py", res[name], *args[name]),
            skip=skip,
            key=key,
            timeout=480.0,
            exclusive=cuda,
        )

    return [
        make("moe_layer", "our grouped MoE layer vs litgpt's LLaMAMoE and the dense floor", moe_layer_key),
        make("train_step", f"one optimizer step, ours vs HF PhiForCausalLM, {train_step}", train_step_key),
        make("instruct", "QLoRA step cost and peak memory of both methods, sequence 1024, micro-batch 4, "
             "checkpointing" if cuda else "QLoRA step cost of both methods", instruct_key),
        make("generate", "KV-cache generation vs HF generate and the capstone loop", generate_bench_key),
        make("align", "alignment step with the feature cache vs CLIP every step vs HF", align_bench_key),
    ]  # fmt: skip


def scale_out_layers(n_gpus: int) -> int:
    """Depth of `phi-2-moe` in the multi-GPU section: all 32 layers from 8 GPUs on; 16 below, where the weights,
    gradients and AdamW state (16 bytes a parameter, over 6B parameters, split over the GPUs) and micro-batch 4's
    activations at sequence 2048 would not fit in 80 GB."""
    return 32 if n_gpus >= 8 else 16


def _scale_out_checks(device: str, out: Path, n_gpus: int) -> list[Check]:
    cuda = device == "cuda"
    n_procs = n_gpus if cuda else 2
    argv = python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n_procs, "benchmarks/scale_out.py",
                  "--device", device, "--micro_batches", "1,4", "--results_dir", out / "scale_out_fsdp_ep")  # fmt: skip
    if cuda:
        layers = scale_out_layers(n_gpus)
        argv += ["--model_name", "phi-2-moe", "--n_layer", str(layers), "--warmup", "2", "--steps", "5"]
        what = (
            f"benchmarks/scale_out.py over {n_gpus} GPUs (torchrun): phi-2-moe at {layers} of its 32 layers, bf16, "
            "sequence 2048, micro-batch 1 and 4: FSDP vs FSDP + expert parallelism, step time, peak memory, the "
            "all-to-all's share of the step"
        )
    else:
        argv += ["--model_name", "phi-2-moe-tiny", "--seq_len", "32", "--warmup", "1", "--steps", "2"]
        what = "benchmarks/scale_out.py over 2 CPU processes (torchrun, gloo): phi-2-moe-tiny, FSDP vs FSDP + EP"
    skip = "" if not cuda or n_gpus >= 2 else "skip: fewer than 2 GPUs visible (the multi-GPU section needs 2 or more)"
    timeout = 600.0 if cuda else 180.0
    return [Check("scale_out_fsdp_ep", what, argv, skip=skip, key=scale_out_key, timeout=timeout, exclusive=cuda)]


def precision(device: str) -> str:
    return "bf16-mixed" if device == "cuda" else "32-true"


# --- key numbers read after a path exits 0 -------------------------------------------------------------------------


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.is_file():
        raise CheckFailed(f"no {path.name} written")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def gutenberg_key(out: Path, log: str) -> str:
    found = re.search(r"^train\s+(\d+)\s+[\d,]+\s+([\d,]+)\s*\nval\s+(\d+)\s+[\d,]+\s+([\d,]+)", log, re.M)
    if not found:
        raise CheckFailed("no split summary in the output")
    return f"{found[1]} + {found[3]} books, {found[2]} + {found[4]} tokens (train + val)"


def summary_key(name: str) -> Callable[[Path, str], str]:
    def key(out: Path, log: str) -> str:
        summary = json.loads((out / name / "summary.json").read_text())
        if "images" in summary:
            return f"{summary['images']['train']} + {summary['images']['val']} images (train + val)"
        return f"{summary['train_samples']} + {summary['val_samples']} conversations (train + val)"

    return key


def checkpoints_key(out: Path, log: str) -> str:
    root = out / "prepare_checkpoints"
    need = [f"{d}/{f}" for d in ("lm_moe", "lm_dense", "merged") for f in ("lit_model.pth", "model_config.yaml")]
    need += [f"{d}/projector.pth" for d in ("align_moe", "align_dense", "merged")] + ["prompts.jsonl"]
    missing = [n for n in need if not (root / n).is_file()]
    if missing:
        raise CheckFailed(f"{', '.join(missing)} missing")
    found = re.search(r"^parameters: (.+)$", log, re.M)
    return found[1] if found else "checkpoints written"


def _train_summary(run: Path) -> str:
    train = _csv_rows(run / "logs" / "train_log.csv")
    if not train:
        raise CheckFailed("train_log.csv has no rows")
    last, parts = train[-1], []
    if "loss" in last:
        parts.append(f"loss {float(last['loss']):.3f}")
    val = _csv_rows(run / "logs" / "val_log.csv") if (run / "logs" / "val_log.csv").is_file() else []
    if val:
        parts.append(f"val {float(val[-1]['val_loss']):.3f}")
    if last.get("tokens_per_s"):
        parts.append(f"{float(last['tokens_per_s']):,.0f} tok/s")
    if last.get("peak_memory_gb"):
        parts.append(f"peak {float(last['peak_memory_gb']):.2f} GB")
    return ", ".join(parts)


def train_key(name: str) -> Callable[[Path, str], str]:
    def key(out: Path, log: str) -> str:
        if not (out / name / "final").is_dir():
            raise CheckFailed("no final/ checkpoint")
        return _train_summary(out / name)

    return key


def qlora_key(name: str, hf: bool) -> Callable[[Path, str], str]:
    def key(out: Path, log: str) -> str:
        merged = out / name / "merged"
        need = ["lit_model.pth", "projector.pth"] + (["hf/pytorch_model.bin", "hf/config.json"] if hf else [])
        missing = [n for n in need if not (merged / n).is_file()]
        if missing:
            raise CheckFailed(f"merged/ lacks {', '.join(missing)}")
        return _train_summary(out / name) + ("; merged + HF export" if hf else "; merged")

    return key


def resume_key(out: Path, log: str) -> str:
    killed = re.search(r"killed \(SIGKILL\) after (step-\d+)", log)
    resumed = re.search(r"Resumed from \S*?(step-\d+) at step (\d+)", log)
    if not (killed and resumed):
        raise CheckFailed("the log does not show the kill and the resume")
    return f"killed after {killed[1]}, resumed at step {resumed[2]}; " + _train_summary(out / "pretrain_kill_resume")


def generate_key(out: Path, log: str) -> str:
    found = re.findall(r"^\[(\d+ tokens, first after [\d.]+ s|empty answer[^\]]*)\]", log, re.M)
    if not found:
        raise CheckFailed("no answer summary line")
    return found[-1]


def batch_key(out: Path, log: str) -> str:
    answers = out / "generate_batch" / "answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()] if answers.is_file() else []
    if len(rows) != len(BUNDLED_IMAGES) + 1:
        raise CheckFailed(f"{len(rows)} answers for {len(BUNDLED_IMAGES) + 1} prompts")
    return f"{len(rows)} answers, mean {sum(len(r['answer']) for r in rows) / len(rows):.0f} characters"


def bench_payload(out: Path, name: str) -> dict:
    files = sorted((out / f"bench_{name}" / "results").glob(f"{name}_*.json"))
    if not files:
        raise CheckFailed(f"no {name}_*.json written")
    return json.loads(files[0].read_text())


def _rows(payload: dict) -> dict[str, dict]:
    return {r["variant"]: r for r in payload["rows"]}


def moe_layer_key(out: Path, log: str) -> str:
    g = _rows(bench_payload(out, "moe_layer"))["ours_grouped"]
    return f"grouped {g['x_vs_litgpt']:.2f}x litgpt LLaMAMoE, {g['x_of_dense_floor']:.2f}x the dense floor's time"


def train_step_key(out: Path, log: str) -> str:
    rows = _rows(bench_payload(out, "train_step"))
    parts = [f"{name.removeprefix('ours_')} MFU {r['MFU_active']:.1%}" for name, r in rows.items() if "ours" in name]
    return f"dense {rows['ours_dense']['x_vs_hf']:.2f}x HF; " + ", ".join(parts)


def instruct_key(out: Path, log: str) -> str:
    rows = _rows(bench_payload(out, "instruct"))
    x = f"autoregressive p=0.9 {rows['ours_p0.9']['x_of_standard']:.2f}x standard"
    if "peak_GiB" not in rows["standard"]:
        return x
    standard, auto = memory_gb(rows)
    met = "met" if max(standard, auto) <= MEMORY_TARGET_GB else "NOT met"
    return f"peak standard {standard:.1f} GB, autoregressive {auto:.1f} GB (<= {MEMORY_TARGET_GB:.0f} GB: {met}); {x}"


def memory_gb(rows: dict[str, dict]) -> tuple[float, float]:
    """Peak GB of the standard method and of the worst autoregressive variant (dequantised decoding pass)."""
    auto = max(r["peak_GiB"] for n, r in rows.items() if n.startswith("ours_"))
    return rows["standard"]["peak_GiB"] * 2**30 / 1e9, auto * 2**30 / 1e9


def decode_dequantized_advice(out: Path) -> str:
    """What the instruct benchmark's peak memory says about the GPU default of `--decode_dequantized`."""
    try:
        rows = _rows(bench_payload(out, "instruct"))
    except CheckFailed:
        return ""
    if "peak_GiB" not in rows["standard"]:
        return ""
    standard, auto = memory_gb(rows)
    if auto <= MEMORY_TARGET_GB:
        return (
            f"`--decode_dequantized`: keep `true` as the GPU default: with the dequantised decoding pass the "
            f"autoregressive method peaks at {auto:.1f} GB (standard {standard:.1f} GB), within the target."
        )
    return (
        f"`--decode_dequantized`: the dequantised decoding pass peaks at {auto:.1f} GB, over the target (standard "
        f"{standard:.1f} GB): make `false` the GPU default (benchmarks/instruct.py cannot measure `false` yet)."
    )


def scale_out_payload(out: Path) -> dict:
    files = sorted((out / "scale_out_fsdp_ep").glob("scale_out_*.json"))
    if not files:
        raise CheckFailed("no scale_out_*.json written")
    return json.loads(files[0].read_text())


def scale_out_key(out: Path, log: str) -> str:
    rows, parts = scale_out_payload(out)["rows"], []
    for micro in sorted({r["micro_batch"] for r in rows}):
        runs = [r for r in rows if r["micro_batch"] == micro]
        said = []
        for r in runs:
            peak = f", {r['peak_GiB']:.1f} GiB" if "peak_GiB" in r else ""
            a2a = f", all-to-all {r['a2a_share']:.0%}" if r["variant"] != "fsdp" else ""
            said.append(f"{r['variant']} {r['ms_per_step']:.0f} ms{peak}{a2a}")
        parts.append(f"micro-batch {micro}: " + " vs ".join(said))
    return "; ".join(parts)


def generate_bench_key(out: Path, log: str) -> str:
    rows = _rows(bench_payload(out, "generate"))
    return (
        f"ours {rows['hf_generate']['x_ours_speedup']:.2f}x HF generate, "
        f"{rows['capstone_app_loop']['x_ours_speedup']:.1f}x the capstone loop"
    )


def align_bench_key(out: Path, log: str) -> str:
    rows = _rows(bench_payload(out, "align"))
    c = rows["ours_cached"]
    return f"cached {c['x_vs_capstone_style']:.1f}x CLIP every step, {c['samples_per_s']:.0f} samples/s"


# --- helpers run inside a path's own process ----------------------------------------------------------------------


def make_checkpoints(tokenizer_dir: str, root: str) -> None:
    """Random-weight tiny LMs (`lm_moe`, `lm_dense`), aligned projectors on them on a random-init CLIP
    (`align_moe`, `align_dense`), the MoE one merged with random LoRA adapters (`merged`) and `prompts.jsonl`."""

    import torch
    from litgpt.config import find_multiple

    from litgpt_mm.config import Config
    from litgpt_mm.model import GPT, save_checkpoint
    from litgpt_mm.models.qlora import LoRASettings, add_lora
    from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT
    from litgpt_mm.training.checkpoint import copy_tokenizer_files, load_tokenizer

    root_dir = Path(root)
    vocab = load_tokenizer(Path(tokenizer_dir)).vocab_size
    torch.manual_seed(0)
    models, sizes = {}, []
    for kind, name in (("moe", "phi-2-moe-tiny"), ("dense", "phi-2-tiny")):
        lm = GPT(Config.from_name(name, vocab_size=vocab, padded_vocab_size=find_multiple(vocab, 64)))
        sizes.append(f"{name} {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M")
        save_checkpoint(lm, root_dir / f"lm_{kind}")
        copy_tokenizer_files(Path(tokenizer_dir), root_dir / f"lm_{kind}")
        config = MultimodalConfig(clip_pretrained=None, lm_checkpoint_dir=str((root_dir / f"lm_{kind}").resolve()))
        models[kind] = MultimodalGPT(lm, config)
        models[kind].save_adapter(root_dir / f"align_{kind}")
    add_lora(models["moe"].lm, LoRASettings(dropout=0.0, mlp=True))
    for n, p in models["moe"].lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    from litgpt_mm.finetune.qlora import export_merged

    export_merged(models["moe"], root_dir / "lm_moe", root_dir / "merged")
    rows = [
        {"id": i, "prompt": "What is in the picture?", "image": str(ROOT / "data" / "images" / name)}
        for i, name in enumerate(BUNDLED_IMAGES)
    ]
    rows.append({"id": len(rows), "prompt": "Write one sentence about the sea."})
    (root_dir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"Checkpoints under {root_dir}: {sorted(p.name for p in root_dir.iterdir())}")
    print(f"parameters: {', '.join(sizes)} (random weights)")


def kill_and_resume(out_dir: str, *args: str) -> None:
    """Run a recipe (`args`, script first) into `out_dir`, SIGKILL it once its first checkpoint is in place, rerun it
    with `--resume auto`, and require that it resumed from that checkpoint and wrote `final/`."""
    out = Path(out_dir)
    argv = [sys.executable, *args, "--out_dir", str(out)]
    print("$", shlex.join(argv), flush=True)
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    while proc.poll() is None and not any(out.glob("step-*")):  # checkpoints are renamed into place when complete
        time.sleep(0.02)
    if proc.poll() is not None:
        raise SystemExit(f"the run ended (status {proc.returncode}) before it could be killed after a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if (out / "final").exists():
        raise SystemExit("the run wrote final/ before the kill: give it more steps")
    print(f"\nkilled (SIGKILL) after {sorted(p.name for p in out.glob('step-*'))[-1]}\n", flush=True)
    rerun = subprocess.Popen([*argv, "--resume", "auto"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    said = []
    for line in rerun.stdout:  # into the log as it comes, and kept to check
        print(line, end="", flush=True)
        said.append(line)
    if rerun.wait() != 0:
        raise SystemExit(f"the resumed run failed with status {rerun.returncode}")
    if not any(line.startswith("Resumed from") for line in said) or not (out / "final" / "lit_model.pth").is_file():
        raise SystemExit("the rerun did not resume from the checkpoint or did not write final/")


# --- running and reporting -----------------------------------------------------------------------------------------


def child_env(device: str, jobs: int) -> dict[str, str]:
    env = {**os.environ, "USE_TORCH_XLA": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(PYTHONUNBUFFERED="1", PYTHONHASHSEED="0")
    if device == "cpu":  # the cores shared by the paths running at once (more threads only spin)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_one(check: Check, out_dir: Path, env: dict[str, str]) -> Result:
    """Run one path in its own process group; its output goes to `<out_dir>/logs/<name>.log`."""
    import shutil

    log = out_dir / "logs" / f"{check.name}.log"
    shutil.rmtree(out_dir / check.name, ignore_errors=True)
    (out_dir / check.name).mkdir(parents=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(check.argv)}\n\n")
        f.flush()
        proc = subprocess.Popen(
            check.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=check.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if rc is None:
        return Result(check.name, "fail", seconds, f"timeout after {check.timeout:.0f} s", str(log))
    if rc != 0:
        return Result(check.name, "fail", seconds, f"exit {rc}: {last_line(text)}", str(log))
    try:
        key = check.key(out_dir, text) if check.key else ""
    except (CheckFailed, OSError, KeyError, ValueError) as err:
        return Result(check.name, "fail", seconds, f"exit 0 but {err}", str(log))
    return Result(check.name, "pass", seconds, key, str(log))


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("(set LITGPT_MM_DEBUG")]
    return lines[-1][:300] if lines else "(no output)"


def run_checks(selected: list[Check], out_dir: Path, jobs: int, env: dict[str, str]) -> list[Result]:
    """Run the paths, up to `jobs` at a time (an exclusive one alone), each once its inputs passed."""
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    done: dict[str, Result] = {}
    pending, running = list(selected), {}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        while pending or running:
            for check in list(pending):
                blocked = [d for d in check.needs if d in done and done[d].status != "pass"]
                if check.skip or blocked:
                    status, _, why = check.skip.partition(": ") if check.skip else ("skip", "", "")
                    why = why or f"needs {blocked[0]}, which did not pass"
                    done[check.name] = report_line(Result(check.name, status, result=why), len(done), len(selected))
                    pending.remove(check)
                elif _can_start(check, done, running, jobs):
                    running[pool.submit(run_one, check, out_dir, env)] = check
                    pending.remove(check)
            if running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    check = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as err:  # a bug here must not hide the other paths
                        result = Result(check.name, "fail", result=f"gpu_check: {type(err).__name__}: {err}")
                    done[check.name] = report_line(result, len(done), len(selected))
            elif pending:  # nothing runs and nothing could start
                raise RuntimeError(f"paths wait on paths not selected: {[c.name for c in pending]}")
    return [done[c.name] for c in selected]


def _can_start(check: Check, done: dict[str, Result], running: dict[Future, Check], jobs: int) -> bool:
    if not all(d in done for d in check.needs) or len(running) >= jobs:
        return False
    return not running or not (check.exclusive or any(c.exclusive for c in running.values()))


def report_line(result: Result, n_done: int, total: int) -> Result:
    print(
        f"[{n_done + 1:2d}/{total}] {result.status:<11} {result.name:<24} {result.seconds:6.1f} s  {result.result}",
        flush=True,
    )
    return result


def select(all_checks: list[Check], only: str | list[str] | None) -> list[Check]:
    """The paths named in `only` (comma-separated or a list) plus every path they need, in report order."""
    if not only:
        return all_checks
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    by_name = {c.name: c for c in all_checks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: unknown path; `--list` shows them: {', '.join(by_name)}")
    wanted, stack = set(), names
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name[name].needs)
    return [c for c in all_checks if c.name in wanted]


def machine_info(device: str) -> dict:
    """Versions and hardware that a GPU box needs to match, for the report."""
    import platform
    from importlib import metadata

    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("bitsandbytes", "lightning", "litgpt", "transformers", "open_clip_torch"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    info["cpus"] = os.cpu_count()
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        info["driver"] = _first_line("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    info["commit"] = _first_line("git", "rev-parse", "--short", "HEAD")
    return info


def _first_line(*command: str) -> str | None:
    """The first line a command prints, or None when it is missing or fails."""
    import shutil

    if shutil.which(command[0]) is None:
        return None
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[0] if proc.returncode == 0 and lines else None


def device_slug(info: dict) -> str:
    if "gpu" not in info:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().removeprefix("nvidia").strip()).strip("-") or "cuda"


def write_report(
    results: list[Result],
    selected: list[Check],
    info: dict,
    argv: list[str],
    wall_s: float,
    out_dir: Path,
    results_dir: Path,
) -> Path:
    """`<results_dir>/gpu_check_<device>.md` and `.json`: the table, the machine, what each path ran, and the
    benchmarks' own notes."""
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip", "unsupported")}
    for r in results:
        if r.status == "pass" and r.name.startswith("bench_"):
            r.notes = bench_payload(out_dir, r.name.removeprefix("bench_")).get("notes", [])
        elif r.status == "pass" and r.name == "scale_out_fsdp_ep":
            r.notes = scale_out_payload(out_dir).get("notes", [])
    stem = results_dir / f"gpu_check_{device_slug(info)}"
    results_dir.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {
        "when": when,
        "command": argv,
        "wall_s": wall_s,
        "machine": info,
        "counts": counts,
        "paths": [{**asdict(r), "what": c.what} for r, c in zip(results, selected, strict=True)],
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    title = info.get("gpu", "CPU dry run")
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines = [
        f"# GPU check: {title}",
        "",
        f"{when}, commit `{info.get('commit')}`, {wall_s / 60:.1f} min: {summary}",
        "",
        f"`{shlex.join(argv)}`",
        "",
        f"machine: `{json.dumps(info)}`",
        "",
        "| path | status | seconds | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.result.replace('|', '/')} |" for r in results]
    advice = decode_dequantized_advice(out_dir)
    lines += ["", advice] if advice else []
    lines += ["", "## What each path ran", ""] + [f"- `{c.name}`: {c.what}" for c in selected]
    for r in results:
        if r.notes:
            lines += ["", f"## {r.name}", ""] + [f"- {n}" for n in r.notes]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def check_all(
    selected: list[Check], out_dir: Path, results_dir: Path, device: str, jobs: int, argv: list[str] | None = None
) -> int:
    """Run `selected`, print and write the report; 1 if a path failed, else 0."""
    start = time.perf_counter()
    info = machine_info(device)
    print(
        f"{len(selected)} paths on {info.get('gpu', 'CPU')}, {jobs} at a time; logs in {out_dir / 'logs'}", flush=True
    )
    results = run_checks(selected, out_dir, jobs, child_env(device, jobs))
    report = write_report(results, selected, info, argv or sys.argv, time.perf_counter() - start, out_dir, results_dir)
    print("\n" + report.read_text())
    print(f"Report: {report} (+ .json)")
    return int(any(r.status == "fail" for r in results))


def main(
    device: str | None = None,
    only: str | None = None,
    list: bool = False,
    out_dir: Path = Path("out/gpu_check"),
    results_dir: Path = ROOT / "benchmarks" / "results",
    jobs: int | None = None,
) -> int:
    """Run every GPU path (or `--device cpu`: the dry run) and write the pass/fail table with the numbers.

    Args:
        device: `cuda` (the default) or `cpu` (the dry run: the same paths with tiny sizes in fp32).
        only: comma-separated path names (each with the paths it needs); `--list` shows them.
        list: print the paths for `device` and exit.
        out_dir: work directories and `logs/<path>.log` (each path's directory is replaced when it runs).
        results_dir: where `gpu_check_<device>.md` and `.json` go.
        jobs: paths run at a time (default 2 on the CPU, 3 on a GPU; the benchmarks always run alone on a GPU).
    """
    import torch

    device = device or "cuda"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: choose `cuda` or `cpu` (the dry run)")
    if device == "cuda" and not torch.cuda.is_available() and not list:
        raise ValueError("--device cuda: no CUDA device is visible; `--device cpu` runs the dry run")
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    out_dir = Path(out_dir).resolve()
    selected = select(checks(device, out_dir, max(1, n_gpus)), only)
    if list:
        for c in selected:
            needs = f" (after {', '.join(c.needs)})" if c.needs else ""
            print(f"{c.name:<24} {c.skip or c.what}{needs}")
        return 0
    jobs = jobs or (3 if device == "cuda" else 2)
    return check_all(selected, out_dir, Path(results_dir), device, jobs)
