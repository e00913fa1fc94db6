"""Train pacsai's demo bundles on phantoms the project generates (seeded, CPU, minutes).

    .venv/bin/python models/train.py [ct] [mr] [cr] [--quick]

Each bundle's network is the ``network_def`` of its own ``configs/inference.json``, and the
training inputs go through that bundle's own preprocessing (without the file loader), exactly as
pacsai feeds it at inference time; the labels follow the same spatial transforms with nearest
neighbour interpolation. Training uses phantom seeds from 10000 upwards; the tests evaluate on
seeds below 1000, which the models never saw. The weights land in ``<bundle>/models/model.pt``
and a record of the run in ``<bundle>/docs/training.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    Orientationd,
    RandCropByPosNegLabeld,
    RandRotated,
    RandSpatialCropd,
    Spacingd,
)

from pacsai.inference.model import as_meta_tensor
from pacsai.inference.volume import Volume
from pacsai.phantom import ChestRadiograph, CTAbdomen, Grid, MRBrain
from pacsai.phantom.dicom import CT_FOV_MM, CT_SPACING_MM, MR_FOV_MM, MR_SPACING_MM

HERE = Path(__file__).resolve().parent
TRAIN_SEED_BASE = 10_000


def _parser(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"] = [
        t for t in config["preprocessing"]["transforms"] if "LoadImage" not in t["_target_"]
    ]
    parser.read_config(config)
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    return parser


def _volume(array: np.ndarray, affine: np.ndarray, modality: str) -> Volume:
    return Volume(
        array=array.astype(np.float32),
        affine=affine,
        sources=tuple((f"2.25.{k + 1}", None) for k in range(array.shape[0])),
        modality=modality,
        series_instance_uid="2.25.1",
        frame_of_reference_uid=None,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def _grid_for(kind: str, rng: np.random.Generator) -> Grid:
    fov, spacing = (CT_FOV_MM, CT_SPACING_MM) if kind == "ct" else (MR_FOV_MM, MR_SPACING_MM)
    choice = rng.random()
    if choice < 0.4:
        return Grid.axial(fov, spacing, reverse=bool(rng.random() < 0.3))
    if choice < 0.5:
        return Grid.sagittal(fov, spacing)
    angles = tuple(float(a) for a in rng.uniform(-25, 25, size=3))
    return Grid.oblique(fov, spacing, angles_deg=angles)  # type: ignore[arg-type]


def _prepared_cases(kind: str, parser: ConfigParser, count: int) -> list[dict[str, Any]]:
    """Phantoms through the bundle's preprocessing; labels through the same geometry."""
    preprocessing = parser.get_parsed_content("preprocessing")
    pixdim = next(
        t.spacing_transform.pixdim for t in preprocessing.transforms if isinstance(t, Spacingd)
    )
    label_geometry = Compose(
        [
            Orientationd(keys="label", axcodes="RAS", labels=None),
            Spacingd(keys="label", pixdim=pixdim, mode="nearest"),
        ]
    )
    rng = np.random.default_rng(0)
    cases = []
    for index in range(count):
        seed = TRAIN_SEED_BASE + index
        phantom = CTAbdomen(seed) if kind == "ct" else MRBrain(seed)
        grid = _grid_for(kind, rng)
        image, labels = phantom.render(grid)
        volume = _volume(image, grid.affine(), kind.upper())
        data = preprocessing({"image": as_meta_tensor(volume)})
        label = as_meta_tensor(_volume(labels, grid.affine(), kind.upper()), channel_first=True)
        label = label_geometry({"label": label})["label"]
        cases.append(
            {"image": data["image"].as_tensor(), "label": label.as_tensor().round().long()}
        )
    return cases


def train_segmentation(kind: str, bundle: Path, *, cases: int, iterations: int) -> dict[str, Any]:
    parser = _parser(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    roi = parser["inferer"]["roi_size"]
    out_channels = parser["network_def"]["out_channels"]
    started = time.perf_counter()
    data = _prepared_cases(kind, parser, cases)
    prepared = time.perf_counter() - started
    # Small structures (lesions): half the patches centred on foreground, as MONAI's recipes do.
    crop = (
        RandCropByPosNegLabeld(
            keys=["image", "label"],
            label_key="label",
            spatial_size=roi,
            pos=1,
            neg=1,
            num_samples=1,
        )
        if kind == "mr"
        else RandSpatialCropd(keys=["image", "label"], roi_size=roi, random_size=False)
    )
    augment = Compose(
        [
            crop,
            RandRotated(
                keys=["image", "label"],
                range_x=0.25,
                range_y=0.25,
                range_z=0.25,
                prob=0.5,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
        ]
    )
    augment.set_random_state(seed=0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=kind != "mr")
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=iterations)
    network.train()
    rng = np.random.default_rng(1)
    losses = []
    for step in range(iterations):
        batch = [_first(augment(data[int(i)])) for i in rng.integers(0, len(data), size=2)]
        image = torch.stack(
            [
                b["image"].as_tensor() if hasattr(b["image"], "as_tensor") else b["image"]
                for b in batch
            ]
        )
        label = torch.stack(
            [
                b["label"].as_tensor() if hasattr(b["label"], "as_tensor") else b["label"]
                for b in batch
            ]
        ).long()
        optimiser.zero_grad()
        loss = loss_fn(network(image), label.clamp(0, out_channels - 1))
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == iterations - 1:
            print(f"{kind} step {step:4d} loss {np.mean(losses[-25:]):.4f}", flush=True)
    network.eval()
    return _save(bundle, network, kind, cases, iterations, losses, prepared, started)


def _first(sample: Any) -> Any:
    return sample[0] if isinstance(sample, list) else sample


def train_classifier(bundle: Path, *, cases: int, epochs: int) -> dict[str, Any]:
    parser = _parser(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    preprocessing = parser.get_parsed_content("preprocessing")
    started = time.perf_counter()
    images, targets = [], []
    for index in range(cases):
        radiograph = ChestRadiograph(TRAIN_SEED_BASE + index)
        pixels = radiograph.render()
        volume = _volume(pixels[None], np.eye(4), "CR")
        images.append(preprocessing({"image": as_meta_tensor(volume)})["image"].as_tensor())
        targets.append([float(radiograph.findings.nodule), float(radiograph.findings.effusion)])
    prepared = time.perf_counter() - started
    x = torch.stack(images)
    y = torch.tensor(targets)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    network.train()
    generator = torch.Generator().manual_seed(0)
    losses = []
    iterations = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 16):
            index = order[start : start + 16]
            batch = x[index]
            if torch.rand(1, generator=generator) < 0.5:  # small intensity jitter
                batch = batch * (0.9 + 0.2 * torch.rand(1, generator=generator))
            optimiser.zero_grad()
            loss = loss_fn(network(batch), y[index])
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            iterations += 1
        print(f"cr epoch {epoch:3d} loss {np.mean(losses[-(len(x) // 16) :]):.4f}", flush=True)
    network.eval()
    return _save(bundle, network, "cr", cases, iterations, losses, prepared, started)


def _save(
    bundle: Path,
    network: torch.nn.Module,
    kind: str,
    cases: int,
    iterations: int,
    losses: list[float],
    prepared: float,
    started: float,
) -> dict[str, Any]:
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    record = {
        "kind": kind,
        "phantom_seeds": [TRAIN_SEED_BASE, TRAIN_SEED_BASE + cases - 1],
        "iterations": iterations,
        "final_loss": round(float(np.mean(losses[-20:])), 5),
        "seconds_preparing": round(prepared, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (bundle / "docs").mkdir(exist_ok=True)
    (bundle / "docs" / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("kinds", nargs="*", choices=["ct", "mr", "cr", []], default=[])
    parser.add_argument("--quick", action="store_true", help="a few iterations (smoke test)")
    parser.add_argument("--out", type=Path, default=HERE, help="models directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for kind in args.kinds or ["ct", "mr", "cr"]:
        if kind == "ct":
            train_segmentation(
                "ct",
                args.out / "ct_abdomen_demo",
                cases=4 if args.quick else 60,
                iterations=3 if args.quick else 600,
            )
        elif kind == "mr":
            train_segmentation(
                "mr",
                args.out / "mr_brain_lesion_demo",
                cases=4 if args.quick else 60,
                iterations=3 if args.quick else 1200,
            )
        else:
            train_classifier(
                args.out / "cxr_findings_demo",
                cases=32 if args.quick else 800,
                epochs=1 if args.quick else 15,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
