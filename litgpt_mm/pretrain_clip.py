"""Stage 0, offline only: pretrain a small CLIP contrastively on a COCO-format caption set (the shapes world).

    python scripts/prepare_shapes.py --out_dir data/prepared/shapes_world
    python scripts/pretrain_clip.py --data_dir data/prepared/shapes_world --out_dir out/clip
    python scripts/prepare_coco.py --source_dir data/prepared/shapes_world --subset null --val_subset null \\
        --features true --clip_model shapes-ViT-T-16 --clip_pretrained out/clip/final/open_clip_model.safetensors

Real runs use OpenAI's pretrained CLIP (`--clip_pretrained openai`); offline there is none, so this stands in for
it: an open_clip model (default `shapes-ViT-T-16`: a 3-block ViT of width 128 with 16-pixel patches at 112 px, the
7 x 7 patch grid of ViT-B/32; config in `litgpt_mm/models/clip_configs/`, or any `--model_config` JSON) built with
`open_clip.create_model(..., pretrained=None)` and trained with open_clip's `ClipLoss` on the images of the training
split only (plus hard negatives on a shapes world, and a patch-position loss: `PatchPositions`), each step pairing
every image with one of its captions at random (drawn from the seed and the
micro-batch's position, so a resumed run draws the same). Images go through the model's own
evaluation transform (resize, centre crop, normalise) without augmentation: a crop or a flip would make a caption's
colours and places untrue. The vision tower pools its patch tokens by their average, so the last block's patch
tokens, which `CLIPPatchEncoder` hands to the LM, are what the loss trains.

Checkpoints (`step-*/`, `final/`) hold `open_clip_model.safetensors` (the whole CLIP), `<model_name>.json` (its
open_clip model config, registered by `CLIPPatchEncoder` when it loads the weights), and `open_clip_config.json`
(open_clip's Hub layout: `open_clip.create_model("local-dir:<dir>")` loads the directory too). On a shapes world,
each validation logs the tower's zero-shot accuracy per question type on validation images
(`litgpt_mm/eval/zero_shot.py`), and the end writes `final/zero_shot.json`: the same on the held-out test split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import open_clip
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import instantiate_torch_optimizer
from safetensors.torch import load_file, save
from torch.utils.data import Dataset
from tqdm import tqdm

from litgpt_mm.analysis.preflight import check_fits
from litgpt_mm.data import coco
from litgpt_mm.data.tokens import split_loaders
from litgpt_mm.models.vision import register_model_configs
from litgpt_mm.training.checkpoint import atomic_write
from litgpt_mm.training.loop import (
    Stage,
    check_launcher,
    ddp_fabric,
    fit,
    load_training_state,
    optimizer_spec,
    resolve_resume,
)

WEIGHTS = "open_clip_model.safetensors"
SPLIT_DIRS = {"train": "train2017", "val": "val2017", "test": "test"}


def setup(
    data_dir: Path = Path("data/prepared/shapes_world"),
    out_dir: Path = Path("out/clip"),
    model_name: str = "shapes-ViT-T-16",
    model_config: Path | None = None,
    precision: str | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    train: TrainArgs = TrainArgs(
        save_interval=100,
        log_interval=10,
        global_batch_size=128,
        micro_batch_size=128,
        max_steps=300,
        lr_warmup_steps=20,
        max_norm=1.0,
        min_lr=1e-5,
    ),
    eval: EvalArgs = EvalArgs(interval=100, max_iters=2, initial_validation=True),
    optimizer: str | dict = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-3, "weight_decay": 0.1}},  # noqa: B006
    resume: bool | Literal["auto"] | Path = False,
    seed: int = 42,
    num_workers: int = 0,
    zero_shot_images: int = 40,
    hard_negatives: bool | None = None,
    position_loss: float = 2.0,
    preflight: bool = True,
) -> dict[str, float]:
    """Train a CLIP model contrastively on the image-caption pairs of a COCO-format caption set.

    Args:
        data_dir: a folder with `annotations/captions_{train2017,val2017}.json` and the images under `train2017/`
            and `val2017/` (`scripts/prepare_shapes.py` writes one; so does COCO itself).
        out_dir: checkpoints and logs.
        model_name: open_clip model name (registered: open_clip's own, ours in `litgpt_mm/models/clip_configs/`).
        model_config: an open_clip model config JSON (`embed_dim`, `vision_cfg`, `text_cfg`); the model is then
            named after the file.
        precision: Fabric precision; default `bf16-mixed` on CUDA, `32-true` on CPU.
        devices: devices per node (DDP; `ClipLoss` gathers every rank's features).
        num_nodes: nodes (torchrun or srun on each).
        train: batch sizes, steps and schedule (litgpt's `TrainArgs`); the batch is the contrastive batch.
        eval: validation interval and size.
        optimizer: optimizer spec; its `lr` is the schedule's peak.
        resume: `auto` continues the newest checkpoint in `out_dir`, or a `step-*` directory.
        seed: seed of the initialisation, the data order, the caption draws and the hard negatives.
        num_workers: DataLoader workers (images are preprocessed once into memory, so 0 is usually fastest).
        zero_shot_images: validation images whose questions are answered zero-shot at every validation (a shapes
            world only; 0: none).
        hard_negatives: add a loss that tells each image's full caption from a counterfactual one (one colour,
            kind or place changed, a shape fewer or more; a shapes world only). Default: on for a shapes world.
        position_loss: weight of a loss that predicts each patch token's place in the grid from the token, as the LM
            reads it, through a fixed random readout (`PatchPositions`): contrastive training alone washes the patch
            position out of the tokens, and the LM then cannot tell where a shape is. 0: off.
        preflight: check, before allocating, that the run fits the devices' memory (the capacity plan's estimate);
            `false` skips the check.
    """
    check_launcher(num_nodes)
    optimizer = optimizer_spec(optimizer)
    if model_config is not None:
        open_clip.add_model_config(Path(model_config))
        model_name = Path(model_config).stem
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"--model_name {model_name!r}: not an open_clip model; pass --model_config <name>.json")
    check_fits(
        None,
        stage="clip",
        clip_model=model_name,
        micro_batch_size=train.micro_batch_size,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        optimizer=optimizer,
        enabled=preflight,
    )
    fabric = ddp_fabric(devices, num_nodes, precision)
    world = (Path(data_dir) / "summary.json").is_file()
    if hard_negatives and not world:
        raise ValueError(f"--hard_negatives needs a shapes world (scripts/prepare_shapes.py); {data_dir} is not one")
    hard_negatives = world if hard_negatives is None else hard_negatives
    return fabric.launch(
        main,
        Path(data_dir),
        Path(out_dir),
        model_name,
        train,
        eval,
        optimizer,
        resume,
        seed,
        num_workers,
        zero_shot_images,
        hard_negatives,
        position_loss,
    )


class CaptionedImages(Dataset):
    """Images preprocessed once into memory, with every caption of each tokenized: `(pixels, captions, index)`."""

    def __init__(self, records: list[coco.CaptionRecord], root: Path, preprocess, tokenizer, desc: str) -> None:
        self.records = records
        self.pixels = torch.stack([preprocess(coco.load_rgb(root / r.file)[0]) for r in tqdm(records, desc=desc)])
        self.captions = [tokenizer(r.captions) for r in records]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.pixels[index], self.captions[index], index


def pick_captions(batch: tuple, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and one caption per image: drawn with `generator`, or the first caption without one."""
    pixels, captions, _ = batch
    rows = [c[int(torch.randint(len(c), (), generator=generator))] if generator else c[0] for c in captions]
    return pixels, torch.stack(rows)


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    return torch.stack([p for p, _, _ in items]), [c for _, c, _ in items], [i for _, _, i in items]


class HardNegatives:
    """Shapes-world hard negatives: for each image its full caption (`shapes.describe`) and the caption of a
    counterfactual scene with one thing changed (`shapes.counterfactual`), tokenized as `(positives, negatives)`.

    Contrastive batches of random scenes are told apart by their colours alone, so plain `ClipLoss` learns colour
    first and the rest late; telling each image's caption from its counterfactual takes kinds, places and counts too
    (NegCLIP's hard negatives, Yuksekgonul et al. 2023).
    """

    def __init__(self, world: Path, records: list[coco.CaptionRecord], tokenizer) -> None:
        from litgpt_mm.data import shapes

        self.shapes, self.tokenizer = shapes, tokenizer
        s = json.loads((Path(world) / "summary.json").read_text())
        self.max_shapes = s["max_shapes"]
        self.scenes = [
            shapes.make_example(s["seed"], r.image_id, s["max_shapes"], s["noise"]).scene.shapes for r in records
        ]

    def __call__(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        import random

        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        scenes = [self.scenes[i] for i in indices]
        positives = [self.shapes.describe(s) for s in scenes]
        negatives = [self.shapes.describe(self.shapes.counterfactual(s, rng, self.max_shapes)) for s in scenes]
        return self.tokenizer(positives), self.tokenizer(negatives)


def load_split(data_dir: Path, split: str, preprocess, tokenizer) -> CaptionedImages:
    """A split's captions and images; unusable ones are counted and reported, none is silently dropped."""
    summary = coco.CocoSummary()
    directory = SPLIT_DIRS[split]
    ann = data_dir / "annotations" / f"captions_{directory}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: no captions for the {split} split; run scripts/prepare_shapes.py first")
    records = coco.validate_images(coco.read_annotations(ann, directory, summary), data_dir, split, summary)
    if summary.skipped:
        print(summary.report())
    return CaptionedImages(records, data_dir, preprocess, tokenizer, f"preprocess {split} images")


class PatchPositions:
    """The patch-position loss: each patch token, as the LM reads it (the last block's output, as `CLIPPatchEncoder`
    reads it by default, taken by a hook on the tower's forward), is scored against every grid index through a fixed
    random unit-norm readout; the loss is the cross-entropy of its own index (position prediction, Zhai et al. 2022),
    added to the training loss times `weight`.

    The readout is fixed so that the tower itself must keep each token's place prominent: a trained readout adapts
    to whatever the tower keeps, and then the LM reads the position no better than without the loss (measured in
    `reports/eval-cpu-shapes`).
    """

    def __init__(self, visual: torch.nn.Module, seed: int, weight: float = 1.0) -> None:
        self.weight = weight
        self.n_patches = visual.grid_size[0] * visual.grid_size[1]
        generator = torch.Generator().manual_seed(seed)
        readout = torch.randn(self.n_patches, visual.transformer.width, generator=generator)
        self.readout = torch.nn.functional.normalize(readout, dim=1)
        self._tokens: torch.Tensor | None = None
        visual.transformer.resblocks[-1].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output: torch.Tensor) -> None:
        self._tokens = output[:, -self.n_patches :]

    def loss(self) -> torch.Tensor:
        """Cross-entropy of the grid indices of the patch tokens of the tower's last forward."""
        tokens = self._tokens
        logits = tokens @ self.readout.to(tokens.device, tokens.dtype).T
        target = torch.arange(self.n_patches, device=logits.device).expand(len(logits), -1)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def save_clip(model: torch.nn.Module, model_name: str, preprocess_cfg: dict, directory: Path) -> None:
    """The CLIP weights and configs in open_clip's layouts (atomically, file by file)."""
    model_cfg = open_clip.get_model_config(model_name)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda f: f.write(save(state)))
    hub = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    for name, obj in ((f"{model_name}.json", model_cfg), ("open_clip_config.json", hub)):
        atomic_write(directory / name, lambda f, o=obj: f.write((json.dumps(o, indent=2) + "\n").encode()))


def main(
    fabric: L.Fabric,
    data_dir: Path,
    out_dir: Path,
    model_name: str,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_spec,
    resume,
    seed: int,
    num_workers: int,
    zero_shot_images: int,
    hard_negatives: bool,
    position_loss: float,
) -> dict[str, float]:
    """Build the CLIP model, its data and the optimizer, then train with the shared `fit`."""
    resume_dir = resolve_resume(resume, out_dir)
    fabric.seed_everything(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, output_dict=True)
    if resume_dir is not None:
        model.load_state_dict(load_file(resume_dir / WEIGHTS))
    positions = PatchPositions(model.visual, seed, position_loss) if position_loss else None
    tokenizer = open_clip.get_tokenizer(model_name)
    data = {split: load_split(data_dir, split, preprocess, tokenizer) for split in ("train", "val")}
    loaders = clip_loaders(fabric, data, train, seed, str(data_dir), num_workers)
    clip_loss = open_clip.ClipLoss(rank=fabric.global_rank, world_size=fabric.world_size)
    state, peak_lr = setup_training(fabric, model, optimizer_spec, loaders["train"], resume_dir)
    n_visual = sum(p.numel() for p in model.visual.parameters())
    fabric.print(
        f"CLIP {model_name}: {n_visual / 1e6:.2f}M vision parameters, {model.visual.grid_size} patches, "
        f"{len(data['train']):,} training images"
    )

    negatives = HardNegatives(data_dir, data["train"].records, tokenizer) if hard_negatives else None
    loss_fn = contrastive_loss(fabric, state["model"], clip_loss, negatives, seed, loaders["train"], positions)
    world = data_dir if (data_dir / "summary.json").is_file() else None
    on_eval = zero_shot_hook(fabric, model, tokenizer, preprocess, world, zero_shot_images)
    preprocess_cfg = dict(model.visual.preprocess_cfg)

    def save_fn(ckpt_dir: Path) -> None:
        if fabric.global_rank == 0:
            save_clip(model, model_name, preprocess_cfg, ckpt_dir)

    max_steps = train.max_steps or max(1, (train.epochs or 1) * len(loaders["train"]))
    stage = Stage(
        loss_fn,
        save_fn,
        tokens_fn=lambda batch: len(batch[0]),
        on_eval=on_eval,
        unit="images",
        loss_label="contrastive loss (nats; chance ln batch)",
    )
    result = fit(
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
    if world is not None and fabric.global_rank == 0:
        if json.loads((world / "summary.json").read_text())["splits"]["test"]["images"]:
            report_zero_shot(model, tokenizer, preprocess, world, Path(out_dir))
        else:
            print(f"{world} has no test images: no zero-shot report")
    return result


def clip_loaders(
    fabric: L.Fabric, data: dict[str, CaptionedImages], train: TrainArgs, seed: int, where: str, num_workers: int
) -> dict:
    """Resumable loaders of the train and val images: the training one shuffled and dealt to the ranks by
    accumulation step, the validation one in order (`where` names the data in errors)."""
    accumulation = train.gradient_accumulation_iters(fabric.world_size, 1)
    return split_loaders(
        data,
        train.micro_batch_size,
        accumulation,
        seed,
        fabric.global_rank,
        fabric.world_size,
        collate,
        where,
        num_workers,
    )


def setup_training(
    fabric: L.Fabric, model: torch.nn.Module, optimizer_spec, train_loader, resume_dir: Path | None
) -> tuple[dict, float]:
    """The wrapped model and its optimizer (no decay on gains, biases, scale, embeddings) in `fit`'s state, restored
    from `resume_dir` when given; with the optimizer's peak learning rate."""
    wrapped = fabric.setup_module(model)
    opt = fabric.setup_optimizers(instantiate_torch_optimizer(optimizer_spec, _param_groups(model)))
    peak_lr = opt.param_groups[0]["lr"]
    state = {"model": wrapped, "optimizer": opt, "train_dataloader": train_loader, "step": 0, "tokens": 0}
    if resume_dir is not None:
        load_training_state(fabric, state, resume_dir)
        fabric.print(f"Resumed from {resume_dir} at step {state['step']}")
    return state, peak_lr


def contrastive_loss(
    fabric: L.Fabric,
    wrapped: torch.nn.Module,
    clip_loss: open_clip.ClipLoss,
    negatives: HardNegatives | None,
    seed: int,
    train_loader,
    positions: PatchPositions | None = None,
) -> Callable:
    """`Stage`'s loss: `ClipLoss` over each image and one of its captions (drawn in training, the first one in
    validation), plus in training the hard-negative loss when `negatives` is given and the weighted patch-position
    loss when `positions` is."""

    def loss_fn(batch):
        # the draws of a training micro-batch depend on the seed and its position only, so a resumed run repeats them
        draws = torch.Generator().manual_seed(seed * 1_000_003 + train_loader.batches_served)
        pixels, texts = pick_captions(batch, draws if wrapped.training else None)
        out = wrapped(pixels.to(fabric.device), texts.to(fabric.device))
        contrastive = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        metrics = {"logit_scale": out["logit_scale"].detach()}
        loss = contrastive
        if negatives is not None and wrapped.training:
            pos, neg = negatives(batch[2], draws)
            text = wrapped(text=torch.cat([pos, neg]).to(fabric.device))["text_features"]
            pos_f, neg_f = text.chunk(2)
            image = out["image_features"]
            logits = out["logit_scale"] * torch.stack([(image * pos_f).sum(-1), (image * neg_f).sum(-1)], dim=1)
            hard = torch.nn.functional.cross_entropy(
                logits, torch.zeros(len(image), dtype=torch.long, device=logits.device)
            )
            metrics["hard_negative_loss"] = hard.detach()
            loss = loss + hard
        if positions is not None and wrapped.training:
            position = positions.loss()
            metrics["position_loss"] = position.detach()
            loss = loss + positions.weight * position
        return loss, {"loss": contrastive.detach(), **metrics}

    return loss_fn


def zero_shot_hook(
    fabric: L.Fabric, model: torch.nn.Module, tokenizer, preprocess, world: Path | None, zero_shot_images: int
) -> Callable[[int], dict]:
    """The `on_eval` (rank 0, a shapes world only) logging the tower's zero-shot accuracy per question type on the
    first `zero_shot_images` validation images."""

    def on_eval(step: int) -> dict:
        if world is None or zero_shot_images == 0 or fabric.global_rank != 0:
            return {}
        from litgpt_mm.eval.zero_shot import zero_shot

        results = zero_shot(model, tokenizer, preprocess, world, "val", limit=zero_shot_images)
        return {f"zero_shot_{k}": r["accuracy"] for k, r in results.items()}

    return on_eval


def _param_groups(model: torch.nn.Module) -> list[dict]:
    """No weight decay on gains, biases and the logit scale (open_clip's training recipe), nor on embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if plain or "embedding" in name or "token" in name else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def report_zero_shot(model, tokenizer, preprocess, world: Path, out_dir: Path) -> dict:
    """Zero-shot accuracy of the final tower on the held-out test split: printed and saved in `final/`."""
    from litgpt_mm.eval.zero_shot import table, zero_shot

    results = zero_shot(model, tokenizer, preprocess, world, "test")
    final = out_dir / "final"
    atomic_write(final / "zero_shot.json", lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
    print(f"Zero-shot answers of the tower on the held-out test images ({final / 'zero_shot.json'}):")
    print(table(results))
    return results
