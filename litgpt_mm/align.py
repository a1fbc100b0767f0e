"""Stage 1 of the multimodal model: align frozen CLIP patches to a frozen LM by training only the projector.

    python scripts/prepare_coco.py --download_coco true --features true
    litgpt download microsoft/phi-2
    python recipes/align.py --lm_checkpoint_dir checkpoints/microsoft/phi-2
    python recipes/align.py --config recipes/configs/align_tiny.yaml       # CPU, bundled sample, minutes

The LM is any litgpt checkpoint directory (phi-2 from `litgpt download`, or `recipes/pretrain_moe.py`'s
`final/`). Each (image, caption) pair is a sample laid out as `[49 projected patches, separator, caption, EOS]`
with the loss on the caption tokens only. Checkpoints (`out_dir/step-*/`, `out_dir/final/`) hold the projector
(`projector.pth`), `multimodal_config.yaml` (which names the LM checkpoint) and the tokenizer; each evaluation
logs the validation loss and greedy captions of fixed validation images (`logs/samples.md`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import instantiate_torch_optimizer

from litgpt_mm.analysis.preflight import check_fits
from litgpt_mm.config import Config
from litgpt_mm.data import coco
from litgpt_mm.data.tokens import ResumableLoader, ResumableSampler
from litgpt_mm.model import load_model
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import (
    MultimodalConfig,
    MultimodalGPT,
    generate,
    separator_token_id,
    target_cross_entropy,
)
from litgpt_mm.training.checkpoint import copy_tokenizer_files, load_tokenizer
from litgpt_mm.training.loop import (
    Stage,
    check_launcher,
    ddp_fabric,
    fit,
    load_training_state,
    optimizer_spec,
    resolve_resume,
)


def setup(
    lm_checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    data_dir: Path = Path("data/prepared/coco"),
    out_dir: Path = Path("out/align"),
    clip_model: str = "ViT-B-32",
    clip_pretrained: str | None = "openai",
    clip_layer: int = -1,
    feature_cache: bool = True,
    feature_dir: Path = Path("data/cache/clip_features"),
    projector: Literal["linear", "resblock", "mlp2x_gelu"] = "resblock",
    separator: str = "learned",
    max_caption_tokens: int = 64,
    precision: str | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    train: TrainArgs = TrainArgs(
        save_interval=500,
        log_interval=10,
        global_batch_size=64,
        micro_batch_size=16,
        epochs=1,
        lr_warmup_steps=100,
        max_norm=1.0,
        min_lr=1e-5,
    ),
    eval: EvalArgs = EvalArgs(interval=500, max_iters=50, initial_validation=True, max_new_tokens=30),
    optimizer: str | dict = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}},  # noqa: B006
    resume: bool | Literal["auto"] | Path = False,
    seed: int = 42,
    num_workers: int = 2,
    num_sample_images: int = 3,
    feature_norm: Literal["none", "standardize"] = "none",
    eval_captions: Path | None = None,
    eval_images_root: Path | None = None,
    eval_limit: int = 40,
    preflight: bool = True,
) -> dict[str, float]:
    """Train the projector (and learned separator) between frozen CLIP and a frozen LM on COCO captions.

    Args:
        lm_checkpoint_dir: litgpt checkpoint directory of the language model (with its tokenizer).
        data_dir: output of `scripts/prepare_coco.py`.
        out_dir: checkpoints and logs.
        clip_model: open_clip vision model.
        clip_pretrained: open_clip weights tag (None: random initialisation, for offline runs).
        clip_layer: vision block whose patch features are used.
        feature_cache: read cached fp16 CLIP features (built here for images not cached yet) instead of running
            CLIP every step.
        feature_dir: root of the feature cache.
        projector: projector type.
        separator: `learned`, or a tokenizer token (e.g. `"\\n"`) placed after each image.
        max_caption_tokens: captions are cut to this many tokens (EOS included).
        precision: Fabric precision; default `bf16-mixed` on CUDA (the frozen LM is then stored in bf16),
            `32-true` on CPU.
        devices: devices per node. Several run DDP (NCCL on GPUs, gloo on CPU): only the projector trains, and the
            frozen LM fits one GPU in bf16 (Phi-2: 5.6 GB), so FSDP would add two all-gathers of it per step for
            no memory a GPU needs. Any split of the same global batch trains the same curve.
        num_nodes: nodes (started by torchrun or srun on each; see docs/scale_out.md).
        train: batch sizes, epochs or max_steps, schedule (litgpt's `TrainArgs`).
        eval: validation interval and size; `max_new_tokens` bounds the sample captions.
        optimizer: optimizer spec (e.g. `bitsandbytes.optim.AdamW8bit`); its `lr` is the schedule's peak.
        resume: `auto` continues the newest checkpoint in `out_dir`, or a `step-*` directory.
        seed: seed for the projector initialisation and the data order.
        num_workers: DataLoader workers.
        num_sample_images: validation images captioned at each evaluation.
        feature_norm: `standardize` divides the CLIP features, centred on their training mean, by their standard
            deviation per channel before the projector (statistics from up to 1,024 training images, saved with the
            projector); it helps a random or weak vision tower, whose features barely differ between images.
        eval_captions: a COCO captions file (e.g. `captions_val2017.json`) whose first `eval_limit` images are
            captioned at every validation and scored (CIDEr, ROUGE-L) with the image, blind and with another
            image: `val_log.csv` and `logs/accuracy.png` show the scores against the step.
        eval_images_root: the folder of the images of `eval_captions` (default: the file's own folder).
        eval_limit: images captioned per validation.
        preflight: check, before allocating, that the run fits the devices' memory (the capacity plan's estimate);
            `false` skips the check.
    """
    check_launcher(num_nodes)
    optimizer = optimizer_spec(optimizer)
    if (Path(lm_checkpoint_dir) / "model_config.yaml").is_file():  # else `main` says what is missing
        lm_config = Config.from_checkpoint(Path(lm_checkpoint_dir))
        check_fits(
            lm_config,
            stage="align",
            micro_batch_size=train.micro_batch_size,
            seq_len=max_caption_tokens,
            devices=devices,
            num_nodes=num_nodes,
            precision=precision,
            optimizer=optimizer,
            clip_model=clip_model,
            projector=projector,
            enabled=preflight,
        )
    fabric = ddp_fabric(devices, num_nodes, precision)
    return fabric.launch(
        main,
        Path(lm_checkpoint_dir),
        Path(data_dir),
        Path(out_dir),
        clip_model,
        clip_pretrained,
        clip_layer,
        feature_cache,
        Path(feature_dir),
        projector,
        separator,
        max_caption_tokens,
        train,
        eval,
        optimizer,
        resume,
        seed,
        num_workers,
        num_sample_images,
        feature_norm,
        eval_captions,
        eval_images_root,
        eval_limit,
    )


def main(
    fabric: L.Fabric,
    lm_dir: Path,
    data_dir: Path,
    out_dir: Path,
    clip_model: str,
    clip_pretrained: str | None,
    clip_layer: int,
    feature_cache: bool,
    feature_dir: Path,
    projector: str,
    separator: str,
    max_caption_tokens: int,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_spec,
    resume,
    seed: int,
    num_workers: int,
    num_sample_images: int,
    feature_norm: str = "none",
    eval_captions: Path | None = None,
    eval_images_root: Path | None = None,
    eval_limit: int = 40,
) -> dict[str, float]:
    """Build the frozen LM and CLIP, the caption data and the projector, then train with the shared `fit`."""
    resume_dir = resolve_resume(resume, out_dir)
    fabric.seed_everything(seed)
    tokenizer = load_tokenizer(lm_dir, "`litgpt download` or recipes/pretrain_moe.py")
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir} holds no COCO index (meta.json): run scripts/prepare_coco.py first")
    lm = load_frozen_lm(fabric, lm_dir)
    encoder = CLIPPatchEncoder(clip_model, clip_pretrained, layer=clip_layer).to(fabric.device)
    data = load_caption_data(fabric, data_dir, encoder, feature_dir if feature_cache else None)
    mm_config = multimodal_config(encoder, clip_model, clip_pretrained, projector, separator, lm_dir, feature_norm)
    standardize = feature_norm == "standardize" and resume_dir is None
    mm = build_multimodal(fabric, lm, encoder, tokenizer, mm_config, data, standardize)
    set_caption_length(lm, encoder.num_patches + 1, max_caption_tokens, eval.max_new_tokens)
    loaders = caption_loaders(fabric, data, tokenizer, encoder.preprocess, max_caption_tokens, train, seed, num_workers)
    state, peak_lr = setup_training(fabric, mm, optimizer_spec, loaders["train"], resume_dir)
    model = state["model"]
    fabric.print(
        f"LM {lm.config.name} (frozen), CLIP {clip_model} layer {encoder.layer} (frozen, "
        f"{'cached features' if data.cache else 'run every step'}), trainable "
        f"{sum(p.numel() for p in mm.parameters() if p.requires_grad):,} params, "
        f"{len(loaders['train'].dataset):,} training pairs"
    )

    loss_fn = caption_loss(fabric, model, encoder)
    scores_on_eval = caption_scores_hook(
        mm, encoder, tokenizer, eval_captions, eval_images_root, eval_limit, eval.max_new_tokens
    )
    on_eval = sample_captions_hook(
        fabric, mm, encoder, tokenizer, data, Path(out_dir), num_sample_images, eval.max_new_tokens, scores_on_eval
    )

    def save_fn(ckpt_dir: Path) -> None:
        if fabric.global_rank == 0:
            mm.save_adapter(ckpt_dir)
            copy_tokenizer_files(lm_dir, ckpt_dir)

    (Path(out_dir) / "logs").mkdir(parents=True, exist_ok=True)
    accum_batch = train.micro_batch_size * fabric.world_size * train.gradient_accumulation_iters(fabric.world_size, 1)
    max_steps = train.max_steps or max(1, (train.epochs or 1) * len(loaders["train"].dataset) // accum_batch)
    stage = Stage(loss_fn, save_fn, tokens_fn=caption_tokens, on_eval=on_eval)
    return fit(
        fabric,
        stage,
        state,
        out_dir=out_dir,
        train=train,
        eval=eval,
        max_steps=max_steps,
        learning_rate=peak_lr,
        val_loader=loaders["val"],
        resumed_from=resume_dir,
    )


@dataclass
class CaptionData:
    """The caption records of each split, where their images are, and the CLIP feature cache (None: CLIP runs every
    step)."""

    data_dir: Path
    records: dict[str, list[coco.CaptionRecord]]
    images_root: Path
    cache: coco.FeatureCache | None

    def features(self, encoder: CLIPPatchEncoder, records: list[coco.CaptionRecord]) -> torch.Tensor:
        """CLIP patch features of the records' images, from the cache or computed."""
        if self.cache is not None:
            return torch.stack([self.cache.get(r.image_id).float() for r in records])
        return encoder.encode_images([coco.load_rgb(self.images_root / r.file)[0] for r in records])


def load_frozen_lm(fabric: L.Fabric, lm_dir: Path) -> torch.nn.Module:
    """The LM on the device, frozen in eval mode (stored in bf16 under a bf16 precision on CUDA)."""
    lm = load_model(lm_dir, device=fabric.device)
    if "bf16" in str(fabric.strategy.precision.precision) and fabric.device.type == "cuda":
        lm = lm.to(torch.bfloat16)
    lm.requires_grad_(False).eval()
    return lm


def load_caption_data(
    fabric: L.Fabric, data_dir: Path, encoder: CLIPPatchEncoder, feature_dir: Path | None
) -> CaptionData:
    """The train/val records of `scripts/prepare_coco.py`'s index. With a `feature_dir`, rank 0 caches the features
    of images not cached yet and only records whose image has features are kept."""
    images_root = Path(json.loads((data_dir / "meta.json").read_text())["images_root"])
    records = {split: coco.read_index(data_dir / f"{split}.jsonl") for split in ("train", "val")}
    cache = None
    if feature_dir is not None:
        cache = coco.FeatureCache(feature_dir, encoder.key())
        if fabric.global_rank == 0:
            cache.build(encoder, records["train"] + records["val"], images_root, coco.CocoSummary())
        fabric.barrier()
        cache = coco.FeatureCache(feature_dir, encoder.key())  # the index as rank 0 left it
        for split in records:
            records[split] = [r for r in records[split] if r.image_id in cache]
    return CaptionData(data_dir, records, images_root, cache)


def multimodal_config(
    encoder: CLIPPatchEncoder,
    clip_model: str,
    clip_pretrained: str | None,
    projector: str,
    separator: str,
    lm_dir: Path,
    feature_norm: str,
) -> MultimodalConfig:
    """The configuration the checkpoints carry: the CLIP tower as loaded (a local weights file by its absolute path,
    found again from any directory), the projector, the separator and the LM checkpoint."""
    if clip_pretrained and Path(clip_pretrained).is_file():
        clip_pretrained = str(Path(clip_pretrained).resolve())
    return MultimodalConfig(
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        clip_layer=encoder.layer,
        clip_quick_gelu=encoder.quick_gelu,
        vision_width=encoder.width,
        num_patches=encoder.num_patches,
        projector=projector,
        separator=separator,
        lm_checkpoint_dir=str(lm_dir.resolve()),
        feature_norm=feature_norm,
    )


def build_multimodal(
    fabric: L.Fabric,
    lm: torch.nn.Module,
    encoder: CLIPPatchEncoder,
    tokenizer,
    config: MultimodalConfig,
    data: CaptionData,
    standardize: bool,
) -> MultimodalGPT:
    """The frozen LM under a new fp32 projector (and learned separator); `standardize` measures the feature
    statistics on up to 1,024 training images (256 without the cache)."""
    sep_id = separator_token_id(tokenizer, config.separator)
    with fabric.init_module():
        mm = MultimodalGPT(lm, config, separator_id=sep_id)
    mm.projector.float()
    if standardize:
        sample = data.records["train"][: 1024 if data.cache is not None else 256]
        mm.set_feature_statistics(data.features(encoder, sample).to(fabric.device))
    if mm.separator is not None:
        mm.separator.data = mm.separator.data.float()
    return mm


def set_caption_length(lm: torch.nn.Module, prefix: int, max_caption_tokens: int, max_new_tokens: int) -> None:
    """Size the LM for `prefix` image positions and the longest caption, trained or generated; one line when the
    captions do not fit its block size."""
    if prefix + max_caption_tokens > lm.config.block_size:
        raise ValueError(
            f"{prefix} image positions + --max_caption_tokens {max_caption_tokens} exceed the LM's block_size "
            f"{lm.config.block_size}: lower --max_caption_tokens"
        )
    lm.max_seq_length = min(lm.config.block_size, prefix + max(max_caption_tokens, max_new_tokens))


def caption_loaders(
    fabric: L.Fabric,
    data: CaptionData,
    tokenizer,
    preprocess,
    max_caption_tokens: int,
    train: TrainArgs,
    seed: int,
    num_workers: int,
) -> dict[str, ResumableLoader]:
    """Resumable loaders of (image, caption) pairs: the training one shuffled and dealt to the ranks by accumulation
    step, the validation one in order."""
    loaders = {}
    for split, shuffle in (("train", True), ("val", False)):
        ds = coco.CaptionPairs(
            data.records[split], tokenizer, max_caption_tokens, data.images_root, data.cache, preprocess
        )
        accumulation = train.gradient_accumulation_iters(fabric.world_size, 1) if shuffle else 1
        sampler = ResumableSampler(
            len(ds),
            seed,
            train.micro_batch_size,
            shuffle,
            fabric.global_rank,
            fabric.world_size,
            accumulation=accumulation,
        )
        if sampler.batches_per_epoch == 0:
            raise ValueError(f"{data.data_dir / split}.jsonl has {len(ds)} pairs: fewer than a micro-batch per device")
        loaders[split] = ResumableLoader(
            ds, sampler, track=shuffle, num_workers=num_workers, collate_fn=coco.collate_pairs
        )
    return loaders


def setup_training(
    fabric: L.Fabric, mm: MultimodalGPT, optimizer_spec, train_loader: ResumableLoader, resume_dir: Path | None
) -> tuple[dict, float]:
    """The wrapped model and the optimizer of its trainable parameters in `fit`'s state, restored from `resume_dir`
    when given; with the optimizer's peak learning rate."""
    model = fabric.setup(mm)
    params = [p for p in mm.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(instantiate_torch_optimizer(optimizer_spec, params))
    peak_lr = optimizer.param_groups[0]["lr"]  # read before a resume overwrites it with the scheduled value
    state = {"model": model, "optimizer": optimizer, "train_dataloader": train_loader, "step": 0, "tokens": 0}
    if resume_dir is not None:
        mm.load_adapter(resume_dir)
        load_training_state(fabric, state, resume_dir)
        fabric.print(f"Resumed from {resume_dir} at step {state['step']}")
    return state, peak_lr


def caption_loss(fabric: L.Fabric, model: torch.nn.Module, encoder: CLIPPatchEncoder) -> Callable:
    """`Stage`'s loss: cross-entropy on the caption tokens, from cached features or CLIP run on the pixels."""

    def loss_fn(batch: dict):
        if "features" in batch:
            feats = batch["features"].to(fabric.device).float()
        else:
            feats = encoder(batch["pixels"].to(fabric.device)).float()
        logits, targets = model([f[None] for f in feats], batch["ids"], batch.get("labels"), targets_only=True)
        loss = target_cross_entropy(logits, targets)
        return loss, {"loss": loss}

    return loss_fn


def caption_scores_hook(
    mm: MultimodalGPT,
    encoder: CLIPPatchEncoder,
    tokenizer,
    eval_captions: Path | None,
    eval_images_root: Path | None,
    eval_limit: int,
    max_new_tokens: int,
) -> Callable[[int], dict] | None:
    """The captions of `eval_captions`' first `eval_limit` images scored at every validation (None without it)."""
    if eval_captions is None:
        return None
    from litgpt_mm.eval.hook import caption_on_eval

    root = Path(eval_images_root) if eval_images_root else None
    return caption_on_eval(mm, encoder, tokenizer, Path(eval_captions), root, eval_limit, max_new_tokens=max_new_tokens)


def sample_captions_hook(
    fabric: L.Fabric,
    mm: MultimodalGPT,
    encoder: CLIPPatchEncoder,
    tokenizer,
    data: CaptionData,
    out_dir: Path,
    num_images: int,
    max_new_tokens: int,
    scores_on_eval: Callable[[int], dict] | None,
) -> Callable[[int], dict]:
    """Alignment's `on_eval` (rank 0): the caption scores of `scores_on_eval`, and greedy captions of the first
    `num_images` validation images, appended to `logs/samples.md`."""
    samples = data.records["val"][:num_images]

    def on_eval(step: int) -> dict:
        if fabric.global_rank != 0:
            return {}
        row = scores_on_eval(step) if scores_on_eval is not None else {}
        if not samples:
            return row
        lines = [f"\n## step {step}\n"]
        captions = []
        for rec in samples:
            feats = data.features(encoder, [rec])[0]
            empty = torch.zeros(0, dtype=torch.long)
            ids = list(generate(mm, feats[None], empty, max_new_tokens, eos_id=tokenizer.eos_id))
            text = tokenizer.decode(torch.tensor(ids)).strip().replace("\n", " ")
            captions.append(text)
            lines.append(f"- {rec.file}: {text!r} (reference: {rec.captions[0]!r})")
        with open(out_dir / "logs" / "samples.md", "a") as f:
            f.write("\n".join(lines) + "\n")
        return {**row, "sample_captions": " | ".join(captions)}

    return on_eval


def caption_tokens(batch: dict) -> int:
    """Caption tokens of a micro-batch, padding (static-shape batches on XLA) excluded."""
    if "labels" in batch:
        return sum(int((lab != -100).sum()) for lab in batch["labels"])
    return sum(len(i) for i in batch["ids"])
