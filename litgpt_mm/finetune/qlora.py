"""Stage 2 of the multimodal model: QLoRA instruction tuning on LLaVA conversations, LoRA on the nf4 LM plus the
projector, by one-pass LM training or autoregressive prediction with scheduled teacher forcing.

    python scripts/prepare_llava_instruct.py --tokenizer_dir checkpoints/microsoft/phi-2 --download_llava true
    python recipes/qlora_instruct.py --align_dir out/align/final
    python recipes/qlora_instruct.py --method autoregressive --schedule cyclic
    python recipes/qlora_instruct.py --config recipes/configs/qlora_instruct_tiny.yaml      # CPU, bundled sample

The LM (from `align_dir`'s `multimodal_config.yaml`, or `--lm_checkpoint_dir`) gets litgpt LoRA layers and its
linear weights are quantised to nf4 with bitsandbytes module by module (Fabric's bitsandbytes precision is refused
on CPU). CLIP stays frozen (cached features by default). Checkpoints hold only the adapters (`lora.pth`), the
projector and configs; `out_dir/merged/` holds the merged LM in litgpt's layout (ready for `generate/`), and for a
dense Phi model also a Hugging Face export (`merged/hf/`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import lightning as L
import torch
import yaml
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import instantiate_torch_optimizer
from torch.utils.data import Dataset

from litgpt_mm.analysis.preflight import check_fits
from litgpt_mm.config import Config
from litgpt_mm.data import coco
from litgpt_mm.data.tokens import split_loaders
from litgpt_mm.model import load_model
from litgpt_mm.models.qlora import LoRASettings, add_lora, lora_state_dict, merged_state_dict, quantize_nf4
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, separator_token_id, target_cross_entropy
from litgpt_mm.training.checkpoint import atomic_torch_save, copy_tokenizer_files, load_tokenizer, save_config
from litgpt_mm.training.loop import (
    Stage,
    check_launcher,
    ddp_fabric,
    fit,
    load_training_state,
    optimizer_spec,
    resolve_resume,
)
from litgpt_mm.training.scheduled import autoregressive_loss, teacher_forcing_p


class InstructSamples(Dataset):
    """Prepared samples (`ids`, `labels`, image path) with cached CLIP features of their image."""

    def __init__(self, path: Path, cache: coco.FeatureCache) -> None:
        self.samples = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {
            "features": self.cache.get(s["image"]),
            "ids": torch.tensor(s["ids"]),
            "labels": torch.tensor(s["labels"]),
        }


def collate(items: list[dict]) -> dict:
    return {k: [it[k] for it in items] for k in items[0]}


def setup(
    align_dir: Path = Path("out/align/final"),
    lm_checkpoint_dir: Path | None = None,
    data_dir: Path = Path("data/prepared/llava_instruct"),
    out_dir: Path = Path("out/qlora_instruct"),
    feature_dir: Path = Path("data/cache/clip_features"),
    method: Literal["standard", "autoregressive"] = "standard",
    schedule: Literal["constant", "linear", "exponential", "cyclic"] = "linear",
    p_start: float = 1.0,
    p_end: float = 0.5,
    cycles: int = 4,
    lookahead: int = 0,
    decode_dequantized: bool = True,
    quantize: Literal["nf4", "none"] = "nf4",
    lora: LoRASettings = LoRASettings(),
    projector_lr_scale: float = 0.1,
    activation_checkpointing: bool = False,
    precision: str | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    train: TrainArgs = TrainArgs(
        save_interval=500,
        log_interval=10,
        global_batch_size=32,
        micro_batch_size=4,
        epochs=1,
        lr_warmup_steps=50,
        max_norm=1.0,
        min_lr=0.0,
    ),
    eval: EvalArgs = EvalArgs(interval=500, max_iters=50, initial_validation=True),
    optimizer: str | dict = {"class_path": "bitsandbytes.optim.PagedAdamW8bit", "init_args": {"lr": 2e-4}},  # noqa: B006
    resume: bool | Literal["auto"] | Path = False,
    seed: int = 42,
    merge: bool = True,
    eval_questions: Path | None = None,
    eval_images_root: Path | None = None,
    eval_limit: int = 200,
    preflight: bool = True,
) -> dict[str, float]:
    """Instruction-tune the aligned model with QLoRA.

    Args:
        align_dir: `recipes/align.py` output with `projector.pth` and `multimodal_config.yaml`.
        lm_checkpoint_dir: the LM (default: the one named in the alignment config).
        data_dir: `scripts/prepare_llava_instruct.py` output.
        out_dir: checkpoints, logs and the merged model.
        feature_dir: CLIP feature cache root (features are built for images not cached yet).
        method: `standard` (one pass, teacher forcing everywhere) or `autoregressive` (token by token with
            scheduled teacher forcing: a cached greedy decoding pass fixes the model-fed inputs, then one
            teacher-forced pass over them; see `litgpt_mm.training.scheduled`).
        schedule: how the teacher-forcing probability moves from `p_start` to `p_end` over training.
        p_start: teacher-forcing probability at the start.
        p_end: teacher-forcing probability at the end (the low point of `cyclic`).
        cycles: periods of the `cyclic` schedule.
        lookahead: model-fed positions a decoding chunk speculates past (fewer chunks when the model is often
            right; 0: one chunk per model-fed position).
        decode_dequantized: hold the nf4 weights dequantised during the decoding pass of `autoregressive` (faster;
            for Phi-2 in bf16 about 5 GB of extra memory while that pass runs).
        quantize: `nf4` (QLoRA) or `none` (plain LoRA).
        lora: rank, alpha, dropout and target projections (litgpt's LoRA fields).
        projector_lr_scale: the projector's learning rate as a fraction of the LoRA learning rate.
        activation_checkpointing: recompute each block in the backward pass.
        precision: Fabric precision (`bf16-mixed` on CUDA, `32-true` on CPU by default).
        devices: devices per node; several run DDP (NCCL on GPUs, gloo on CPU), each holding the nf4 LM (Phi-2:
            about 1.9 GB) and the same adapters; any split of the same global batch trains the same curve.
        num_nodes: nodes (started by torchrun or srun on each; see docs/scale_out.md).
        train: batch sizes, epochs or max_steps, schedule.
        eval: validation interval and size.
        optimizer: optimizer spec; the paged 8-bit AdamW of bitsandbytes by default.
        resume: `auto` or a `step-*` directory.
        seed: seed for the adapters, the data order and the teacher-forcing draws.
        merge: write `out_dir/merged/` at the end.
        eval_questions: a `recipes/evaluate.py vqa` question file answered at every validation (accuracy per
            question type with the image, blind and with another image, in `val_log.csv` and `accuracy.png`).
        eval_images_root: where those questions' images are (default: next to the file).
        eval_limit: questions answered at each validation (the first N).
        preflight: check, before allocating, that the run fits the devices' memory (the capacity plan's estimate);
            `false` skips the check.
    """
    check_schedule(p_start, p_end, cycles, lookahead)
    check_launcher(num_nodes)
    optimizer = optimizer_spec(optimizer)
    args = SimpleNamespace(**locals())
    args.precision = precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    lm_dir = Path(lm_checkpoint_dir or MultimodalConfig.load(Path(align_dir)).lm_checkpoint_dir)
    if (lm_dir / "model_config.yaml").is_file():  # else `main` says what is missing
        lm_config = Config.from_checkpoint(lm_dir)
        check_fits(
            lm_config,
            stage="qlora",
            micro_batch_size=train.micro_batch_size,
            seq_len=train.max_seq_length or lm_config.block_size,
            devices=devices,
            num_nodes=num_nodes,
            precision=args.precision,
            optimizer=optimizer,
            quantize=quantize,
            lora=lora,
            activation_checkpointing=activation_checkpointing,
            enabled=preflight,
        )
    fabric = ddp_fabric(devices, num_nodes, args.precision)
    return fabric.launch(main, args)


def check_schedule(p_start: float, p_end: float, cycles: int, lookahead: int) -> None:
    """One line naming every teacher-forcing argument out of range (before any work)."""
    bad = [f"--{k} {v}" for k, v in (("p_start", p_start), ("p_end", p_end)) if not 0.0 <= v <= 1.0]
    bad += [f"--cycles {cycles}"] if cycles < 1 else []
    bad += [f"--lookahead {lookahead}"] if lookahead < 0 else []
    if bad:
        allowed = "p_start and p_end are probabilities in [0, 1], cycles >= 1, lookahead >= 0"
        raise ValueError(f"{', '.join(bad)}: {allowed}")


def main(fabric: L.Fabric, a: SimpleNamespace) -> dict[str, float]:
    """Build the data, the nf4 + LoRA model and the optimizer, then train with the shared `fit`."""
    fabric.seed_everything(a.seed)
    out_dir, align_dir = Path(a.out_dir), Path(a.align_dir)
    resume_dir = resolve_resume(a.resume, out_dir)
    mm_config = MultimodalConfig.load(align_dir)
    lm_dir = Path(a.lm_checkpoint_dir or mm_config.lm_checkpoint_dir)
    encoder = CLIPPatchEncoder.from_config(mm_config)
    datasets = load_samples(fabric, Path(a.data_dir), Path(a.feature_dir), encoder)
    encoder = encoder if a.eval_questions is not None else None  # CLIP is needed again only to answer questions
    mm, lm, n_quantized = build_model(fabric, a, mm_config, lm_dir, datasets)
    model, opt, peak_lr = setup_optimizer(fabric, mm, a.optimizer, a.projector_lr_scale)
    train = a.train
    accum = train.gradient_accumulation_iters(fabric.world_size, 1)
    loaders = split_loaders(
        datasets,
        train.micro_batch_size,
        accum,
        a.seed,
        fabric.global_rank,
        fabric.world_size,
        collate,
        f"{a.data_dir}/{{train,val}}.jsonl",
    )
    state = {"model": model, "optimizer": opt, "train_dataloader": loaders["train"], "step": 0, "tokens": 0}
    if resume_dir is not None:
        lm.load_state_dict(torch.load(resume_dir / "lora.pth", weights_only=True), strict=False)
        mm.load_adapter(resume_dir)
        load_training_state(fabric, state, resume_dir)
        fabric.print(f"Resumed from {resume_dir} at step {state['step']}")
    trainable = sum(p.numel() for p in mm.parameters() if p.requires_grad)
    fabric.print(
        f"LM {lm.config.name}: {n_quantized} linear layers in nf4, LoRA r={a.lora.r}; trainable {trainable:,} "
        f"params (LoRA + projector); method {a.method}; {len(datasets['train'])} training samples"
    )
    global_batch = accum * train.micro_batch_size * fabric.world_size
    max_steps = train.max_steps or max(1, (train.epochs or 1) * len(datasets["train"]) // global_batch)

    loss_fn = instruct_loss(fabric, a, mm, model, state, loaders["train"], accum, max_steps)

    def save_fn(ckpt_dir: Path) -> None:
        if fabric.global_rank == 0:  # every rank holds the same adapters
            atomic_torch_save(lora_state_dict(lm), ckpt_dir / "lora.pth")
            mm.save_adapter(ckpt_dir)
            (ckpt_dir / "lora_config.yaml").write_text(yaml.safe_dump({**asdict(a.lora), "quantize": a.quantize}))
            copy_tokenizer_files(lm_dir, ckpt_dir)

    on_eval = vqa_hook(a, mm, encoder, lm_dir) if a.eval_questions is not None else None
    tokens_fn = lambda b: sum(int((lab != -100).sum()) for lab in b["labels"])  # noqa: E731
    stage = Stage(loss_fn, save_fn, tokens_fn=tokens_fn, on_eval=on_eval)
    result = fit(
        fabric,
        stage,
        state,
        out_dir=out_dir,
        train=train,
        eval=a.eval,
        max_steps=max_steps,
        learning_rate=peak_lr,
        val_loader=loaders["val"],
        resumed_from=resume_dir,
    )
    if a.merge and fabric.global_rank == 0:
        export_merged(mm, lm_dir, out_dir / "merged")
    fabric.barrier()
    return result


def instruct_loss(
    fabric: L.Fabric,
    a: SimpleNamespace,
    mm: MultimodalGPT,
    model: torch.nn.Module,
    state: dict,
    train_loader,
    accum: int,
    max_steps: int,
) -> Callable:
    """`Stage`'s loss: one teacher-forced pass (`standard`, and every validation), or in `autoregressive` training
    the scheduled teacher-forcing loss at `state`'s step, its draws seeded by the global micro-batch index."""

    def loss_fn(batch: dict):
        feats = [f[None].to(fabric.device).float() for f in batch["features"]]
        if a.method == "standard" or not model.training:
            loss = target_cross_entropy(*model(feats, batch["ids"], batch["labels"], targets_only=True))
            return loss, {"loss": loss}
        p = teacher_forcing_p(a.schedule, state["step"], max_steps, a.p_start, a.p_end, a.cycles)
        # the draws follow the global micro-batch index: the same for any split of the global batch, and on resume
        local = train_loader.batches_served - 1
        served = (local // accum * fabric.world_size + fabric.global_rank) * accum + local % accum + 1
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + served)
        with fabric.autocast():
            loss, info = autoregressive_loss(
                mm, feats, batch["ids"], batch["labels"], p, gen, a.lookahead, model, a.decode_dequantized
            )
        metrics = {
            "loss": loss.detach(),
            "teacher_forcing_p": torch.tensor(p),
            "model_fed": torch.tensor(info.model_fed / max(info.candidates, 1)),
            "model_changed": torch.tensor(info.changed / max(info.candidates, 1)),
        }
        return loss, metrics

    return loss_fn


def setup_optimizer(
    fabric: L.Fabric, mm: MultimodalGPT, optimizer_spec: str | dict, projector_lr_scale: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer, float]:
    """The wrapped model and one optimizer over the LoRA weights and, at `projector_lr_scale` times their learning
    rate, the projector; with the peak learning rate."""
    lora_params = [p for n, p in mm.lm.named_parameters() if p.requires_grad]
    extra = [p for n, p in mm.named_parameters() if p.requires_grad and not n.startswith("lm.")]
    groups = [{"params": lora_params}, {"params": extra, "lr_scale": projector_lr_scale}]
    opt = instantiate_torch_optimizer(optimizer_spec, groups)
    peak_lr = opt.param_groups[0]["lr"]
    model = fabric.setup_module(mm)
    return model, fabric.setup_optimizers(opt), peak_lr


def vqa_hook(a: SimpleNamespace, mm: MultimodalGPT, encoder: CLIPPatchEncoder, lm_dir: Path) -> Callable[[int], dict]:
    """The `on_eval` answering `--eval_questions` at every validation, in the data's prompt template."""
    from litgpt_mm.eval.hook import vqa_on_eval

    meta = Path(a.data_dir) / "meta.json"
    template = json.loads(meta.read_text()).get("template", "phi2") if meta.is_file() else "phi2"
    tokenizer = load_tokenizer(lm_dir)
    return vqa_on_eval(mm, encoder, tokenizer, template, a.eval_questions, a.eval_images_root, a.eval_limit)


def load_samples(fabric: L.Fabric, data_dir: Path, feature_dir: Path, encoder: CLIPPatchEncoder) -> dict:
    """The prepared train/val samples with the CLIP features of their images (built by rank 0, cached)."""
    cache = coco.FeatureCache(feature_dir, encoder.key())
    datasets = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run scripts/prepare_llava_instruct.py first")
        datasets[split] = InstructSamples(path, cache)
        if fabric.global_rank == 0:
            images = sorted({s["image"] for s in datasets[split].samples})
            cache.build(
                encoder.to(fabric.device), [coco.CaptionRecord(p, p, []) for p in images], Path("/"), coco.CocoSummary()
            )
    fabric.barrier()
    cache = coco.FeatureCache(feature_dir, encoder.key())  # the index as rank 0 left it
    for ds in datasets.values():
        ds.cache = cache
    return datasets


def build_model(
    fabric: L.Fabric, a: SimpleNamespace, mm_config: MultimodalConfig, lm_dir: Path, datasets: dict
) -> tuple[MultimodalGPT, torch.nn.Module, int]:
    """The LM with LoRA layers, its linear weights in nf4 (unless `--quantize none`), under the aligned projector."""
    lm = load_model(lm_dir, device=fabric.device)
    lm.requires_grad_(False)
    add_lora(lm, a.lora)
    compute_dtype = torch.bfloat16 if "bf16" in a.precision else torch.float32
    n_quantized = quantize_nf4(lm, compute_dtype) if a.quantize == "nf4" else 0
    lm.activation_checkpointing = a.activation_checkpointing
    sep_id = separator_token_id(load_tokenizer(lm_dir), mm_config.separator)
    mm = MultimodalGPT(lm, mm_config, separator_id=sep_id).to(fabric.device)
    mm.load_adapter(Path(a.align_dir))
    for p in mm.projector.parameters():
        p.requires_grad_(True)
    longest = max(len(s["ids"]) for d in datasets.values() for s in d.samples)
    lm.max_seq_length = min(lm.config.block_size, mm_config.num_patches + 1 + longest)
    return mm, lm, n_quantized


def export_merged(mm: MultimodalGPT, lm_dir: Path, out: Path) -> None:
    """The LM with adapters folded in (litgpt layout), the projector, and for dense Phi a Hugging Face export."""
    out.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(mm.lm)
    atomic_torch_save(state, out / "lit_model.pth")
    save_config(mm.lm.config, out)
    copy_tokenizer_files(lm_dir, out)
    config = MultimodalConfig(**{**asdict(mm.config), "lm_checkpoint_dir": str(out.resolve())})
    atomic_torch_save(mm.adapter_state_dict(), out / "projector.pth")
    config.save(out)
    cfg = mm.lm.config
    if cfg.n_expert == 0 and cfg.mlp_class_name == "GptNeoxMLP" and cfg.parallel_residual:
        from litgpt.scripts.convert_lit_checkpoint import copy_weights_phi

        hf: dict = {}
        copy_weights_phi(cfg, hf, state)
        (out / "hf").mkdir(exist_ok=True)
        atomic_torch_save(hf, out / "hf" / "pytorch_model.bin")
        (out / "hf" / "config.json").write_text(json.dumps(_hf_phi_config(cfg), indent=2))
    print(f"Merged model: {out}")


def _hf_phi_config(cfg) -> dict:
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_query_groups,
        "partial_rotary_factor": cfg.rotary_percentage,
        "max_position_embeddings": cfg.block_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu_new",
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
