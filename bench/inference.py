"""Inference benchmark: pacsai's path against MONAI's own bundle workflow on the same CT volume.

    .venv/bin/python bench/inference.py                       # 512x512x300, the issue's size
    .venv/bin/python bench/inference.py --size 256 --slices 96 --device cpu   # a 2-core CPU
    .venv/bin/python bench/inference.py --bundle ../shared/zoo/wholeBody_ct_segmentation

Without ``--bundle``: a zoo-sized SegResNet (random weights: this measures time, not accuracy)
in a bundle with the usual zoo transforms (Orientationd, Spacingd, ScaleIntensityRanged;
Invertd in postprocessing).

- pacsai: DICOM files -> decode -> volume (sorted, rescaled) -> the bundle's transforms on the
  inference device -> sliding window (AMP on CUDA) -> Invertd on the device -> label map;
- MONAI: the same volume saved as NIfTI, run by ``monai.bundle.ConfigWorkflow`` exactly as the
  bundle defines it (LoadImaged on the CPU, SupervisedEvaluator, SaveImaged).

With ``--bundle DIR``: any single-input bundle as its authors ship it (random weights made from
its ``network_def`` when it has none, saved where its config loads them), run by pacsai and by
its own ``inference.json`` through ``ConfigWorkflow`` (``datalist``, ``dataset_dir``,
``output_dir`` and ``device`` overridden).

Prints seconds per stage, peak memory, the ratio MONAI/pacsai and how many voxels differ.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacsai.inference.bundle import inspect_bundle
from pacsai.inference.model import LPS_TO_RAS, LoadedModel, resolve_device
from pacsai.inference.volume import load_series

BUNDLE_CONFIG = {
    "imports": ["$import glob", "$import os", "$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "dataset_dir": ".",
    "output_dir": ".",
    "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz'))))",
    "network_def": {
        "_target_": "SegResNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "init_filters": 16,
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
            {
                "_target_": "Spacingd",
                "keys": "image",
                "pixdim": [1.5, 1.5, 2.0],
                "mode": "bilinear",
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -1000,
                "a_max": 1000,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    },
    "dataset": {
        "_target_": "Dataset",
        "data": "$[{'image': i} for i in @datalist]",
        "transform": "@preprocessing",
    },
    "dataloader": {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": 1,
        "num_workers": 0,
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [96, 96, 96],
        "sw_batch_size": 4,
        "overlap": 0.25,
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_dtype": "$torch.uint8",
                "resample": False,
                "separate_folder": False,
            },
        ],
    },
    "handlers": [
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
        }
    ],
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
    },
    "run": ["$@evaluator.run()"],
}

METADATA = {
    "version": "0.0.1",
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [96, 96, 96],
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "num_channels": 4,
                "spatial_shape": [96, 96, 96],
                "channel_def": {"0": "background", "1": "liver", "2": "spleen", "3": "kidney"},
            }
        },
    },
}


def make_bundle(root: Path) -> Path:
    bundle = root / "segresnet_bench"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(BUNDLE_CONFIG, indent=1))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=1))
    parser = ConfigParser(BUNDLE_CONFIG)
    torch.manual_seed(0)
    torch.save(
        parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt"
    )
    return bundle


def make_series(folder: Path, size: int, slices: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """A CT series of smooth random anatomy-like blobs, 0.75 mm pixels, 1.0 mm slices."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:slices, :size, :size]
    hu = np.full((slices, size, size), -1000.0, dtype=np.float32)
    body = ((x - size / 2) / (size * 0.42)) ** 2 + ((y - size / 2) / (size * 0.32)) ** 2 < 1
    hu[:, body[0]] = 40
    for _ in range(6):
        c = rng.uniform([0, size * 0.3, size * 0.3], [slices, size * 0.7, size * 0.7])
        r = rng.uniform(
            [slices * 0.1, size * 0.05, size * 0.05], [slices * 0.3, size * 0.12, size * 0.12]
        )
        inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
        hu[inside] = rng.uniform(60, 200)
    hu += rng.normal(0, 10, hu.shape).astype(np.float32)
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = "BENCH"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-size * 0.375, -size * 0.375, float(k)]
        ds.PixelSpacing = [0.75, 0.75]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, hu, stored


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def bundle_under_test(root: Path, given: Path | None) -> Path:
    """The bundle to time: the built-in SegResNet, or a copy of ``given`` with weights."""
    if given is None:
        return make_bundle(root)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.zoo_bundles import prepare_bundle

    models = root / "models"
    models.mkdir()
    return prepare_bundle(given.resolve(), models)


def monai_workflow(bundle: Path, nifti_dir: Path, out: Path, device: torch.device) -> Any:
    """The bundle's own inference config, run by MONAI on the NIfTI file in ``nifti_dir``."""
    config = next(
        bundle / "configs" / name
        for name in ("inference.json", "inference.yaml", "inference.yml")
        if (bundle / "configs" / name).is_file()
    )
    volume = str(nifti_dir / "volume.nii.gz")
    return ConfigWorkflow(
        config_file=str(config),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(nifti_dir),
        datalist=f"$[{volume!r}]",
        output_dir=str(out),
        device=f"$torch.device('{device}')",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle directory to time")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        bundle = bundle_under_test(root, args.bundle)
        info = inspect_bundle(bundle)
        if len(info.inputs) != 1 or info.input_channels != 1:
            print(f"{info.name}: several inputs or channels; this benchmark feeds one series")
            return 2
        print(
            f"volume {args.size}x{args.size}x{args.slices}, {info.name} {info.display_version}, "
            f"device {device}, torch {torch.__version__}"
        )
        series_dir = root / "dicom"
        series_dir.mkdir()
        paths, _, _ = make_series(series_dir, args.size, args.slices)

        model = LoadedModel(info, device, amp=True)
        start = time.perf_counter()
        for path in paths:
            dcmread(path).pixel_array  # noqa: B018 - decode only
        decode = time.perf_counter() - start
        start = time.perf_counter()
        volume = load_series(paths)
        volume_seconds = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.predict(volume)  # warm-up: cuDNN autotuning, allocator
        start = time.perf_counter()
        output = model.predict(volume)
        ours_seconds = volume_seconds + (time.perf_counter() - start)
        ours_peak = peak_memory(device)

        nifti_dir = root / "nifti"
        nifti_dir.mkdir()
        nib.save(
            nib.Nifti1Image(volume.array.transpose(2, 1, 0), LPS_TO_RAS @ volume.affine),
            nifti_dir / "volume.nii.gz",
        )
        workflow = monai_workflow(bundle, nifti_dir, root / "out", device)
        workflow.initialize()
        workflow.run()  # warm-up, as for pacsai
        start = time.perf_counter()
        workflow.run()
        monai_seconds = time.perf_counter() - start
        workflow.finalize()
        written = sorted((root / "out").rglob("*.nii.gz"))
        differ: float | None = None
        if written and output.label_map is not None and output.label_map.ndim == 3:
            theirs = np.asarray(nib.load(written[-1]).dataobj).squeeze().transpose(2, 1, 0)
            if theirs.shape == output.label_map.shape:
                differ = float(np.mean(theirs != output.label_map))

    print(f"{'stage':<28}{'seconds':>10}")
    print(f"{'decode (all slices)':<28}{decode:>10.2f}")
    print(f"{'volume (decode+sort+stack)':<28}{volume_seconds:>10.2f}")
    for stage, seconds in output.timings.items():
        print(f"{stage:<28}{seconds:>10.2f}")
    print(f"{'pacsai total':<28}{ours_seconds:>10.2f}   peak {ours_peak}")
    print(f"{'MONAI ConfigWorkflow total':<28}{monai_seconds:>10.2f}   peak {peak_memory(device)}")
    print(
        f"ratio MONAI / pacsai: {monai_seconds / ours_seconds:.2f}x  (target on an H200: >= 1.5x)"
    )
    if differ is None:
        print("voxels differing: not compared (MONAI wrote no label map on the source grid)")
    else:
        print(f"voxels differing: {differ * 100:.4f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
