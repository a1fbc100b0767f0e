"""What the frozen tower's patch features hold: a linear probe reads each shape's kind, colour and cell (its place in
the world's 3 x 3 grid) from the patch at the shape's centre, or from the 3 x 3 patches around it, trained on the
world's training shapes and scored on its test shapes; the same probe on the random tower of the same architecture is
the baseline.

    python reports/eval-cpu-shapes/linear_probe.py --world out/demo/data/shapes \
        --tower out/demo/clip/final/open_clip_model.safetensors      # after `make demo`; about a minute
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from litgpt_mm.data import shapes
from litgpt_mm.models.vision import CLIPPatchEncoder


def shape_features(encoder: CLIPPatchEncoder, world: Path, split: str, folder: str, window: int) -> tuple:
    """(features, kind, colour, cell) per annotated shape: the `window` x `window` patches around its centre,
    flattened."""
    data = json.loads((world / "annotations" / f"instances_{split}.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    kinds = {c["id"]: c["name"] for c in data["categories"]}
    ids = sorted(images)
    pil = [Image.open(world / folder / images[i]["file_name"]).convert("RGB") for i in ids]
    with torch.no_grad():
        feats = encoder.encode_images(pil).float()
    side = int(feats.size(1) ** 0.5)
    half = window // 2
    grids = torch.nn.functional.pad(feats.view(len(ids), side, side, -1).permute(0, 3, 1, 2), (half,) * 4)
    row = {i: n for n, i in enumerate(ids)}
    x, kind, colour, cell = [], [], [], []
    for a in data["annotations"]:
        left, top, w, h = a["bbox"]
        im = images[a["image_id"]]
        cx, cy = int((left + w / 2) * side / im["width"]), int((top + h / 2) * side / im["height"])
        x.append(grids[row[a["image_id"]], :, cy : cy + window, cx : cx + window].reshape(-1))
        kind.append(shapes.KINDS.index(kinds[a["category_id"]]))
        colour.append(list(shapes.COLOURS).index(a["colour"]))
        cell.append(int((top + h / 2) * 3 / im["height"]) * 3 + int((left + w / 2) * 3 / im["width"]))
    return torch.stack(x), torch.tensor(kind), torch.tensor(colour), torch.tensor(cell)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of a logistic regression on standardised features (Adam, weight decay 1e-4, 500 steps)."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.size(1), int(train_y.max()) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    return (linear(test_x).argmax(1) == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=Path("out/demo/data/shapes"))
    parser.add_argument("--tower", type=Path, default=Path("out/demo/clip/final/open_clip_model.safetensors"))
    parser.add_argument("--model_name", default="shapes-ViT-T-16")
    parser.add_argument("--layer", type=int, default=-1)
    args = parser.parse_args()
    print("| tower | patches | kind (chance 0.25) | colour (chance 0.17) | cell (chance 0.11) |\n|---|---|---|---|---|")
    for name, weights in (("pretrained", args.tower), ("random", None)):
        encoder = CLIPPatchEncoder(args.model_name, pretrained=str(weights) if weights else None, layer=args.layer)
        for window in (1, 3):
            train = shape_features(encoder.eval(), args.world, "train2017", "train2017", window)
            test = shape_features(encoder, args.world, "test", "test", window)
            kind, colour, cell = (probe(train[0], train[k], test[0], test[k]) for k in (1, 2, 3))
            print(f"| {name} | {window} x {window} | {kind:.2f} | {colour:.2f} | {cell:.2f} |")
    print(f"({len(train[1])} training shapes, {len(test[1])} test shapes)")


if __name__ == "__main__":
    main()
