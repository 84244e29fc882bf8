"""A dataset fingerprint whose intensity statistics come from annotated foreground voxels only.

nnU-Net's ``DatasetFingerprintExtractor`` samples "foreground" intensities from every voxel with a
label > 0, the ignore label included. In a scribble or semi-supervised dataset almost every voxel
carries the ignore label, so the statistics describe the whole image instead of the structures
(wrong CT normalisation: clipping percentiles, mean and std). Here foreground means
``0 < label < ignore``. Everything else (spacings, shapes, cropping) is nnU-Net's.

nnU-Net's ``run()`` calls ``DatasetFingerprintExtractor.analyze_case`` by class name inside a
process pool, so a subclass cannot swap the per-case analysis; this class therefore re-implements
``run()`` around ``analyze_case_ignore_aware``, writing the same fingerprint format.
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import List, Type

import numpy as np
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from tqdm import tqdm

from nnunet_weak.atomic import write_json_atomic

PERCENTILES = (0.5, 50.0, 99.5)


def annotated_foreground_intensities(segmentation: np.ndarray, images: np.ndarray, ignore_label: int | None,
                                     num_samples: int, seed: int = 1234) -> list[np.ndarray]:
    """Intensities per channel sampled (with replacement) from annotated foreground voxels.

    Args:
        segmentation: (1, *spatial) label map.
        images: (C, *spatial) image channels.
        ignore_label: the dataset's ignore label, or ``None``.
        num_samples: samples per channel (an empty array when the case has no annotated foreground).

    Returns:
        One 1-D array per channel.
    """
    if segmentation.shape[1:] != images.shape[1:]:
        raise ValueError(f"segmentation {segmentation.shape} and images {images.shape} differ in shape")
    seg = segmentation[0]
    foreground = (seg > 0) if ignore_label is None else ((seg > 0) & (seg != ignore_label))
    rs = np.random.RandomState(seed)
    samples = []
    for channel in images:
        values = channel[foreground]
        samples.append(rs.choice(values, num_samples, replace=True) if values.size else np.zeros(0, channel.dtype))
    return samples


def analyze_case_ignore_aware(image_files: List[str], segmentation_file: str,
                              reader_writer_class: Type[BaseReaderWriter], ignore_label: int | None,
                              num_samples: int):
    """Per-case part of the fingerprint: (shape after crop, spacing, sampled intensities, relative size)."""
    rw = reader_writer_class()
    images, properties = rw.read_images(image_files)
    segmentation, _ = rw.read_seg(segmentation_file)
    data_cropped, seg_cropped, _ = crop_to_nonzero(images, segmentation)
    intensities = annotated_foreground_intensities(seg_cropped, data_cropped, ignore_label, num_samples)
    relative_size = np.prod(data_cropped.shape[1:]) / np.prod(images.shape[1:])
    return data_cropped.shape[1:], properties["spacing"], intensities, relative_size


class IgnoreAwareFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's fingerprint, with intensity statistics from non-background, non-ignore voxels."""

    def run(self, overwrite_existing: bool = False) -> dict:
        output_file = Path(nnUNet_preprocessed.require()) / self.dataset_name / "dataset_fingerprint.json"
        if output_file.is_file() and not overwrite_existing:
            return json.loads(output_file.read_text(encoding="utf-8"))
        ignore_label = self.dataset_json["labels"].get("ignore")
        first_case = next(iter(self.dataset.values()))
        reader_writer_class = determine_reader_writer_from_dataset_json(self.dataset_json, first_case["images"][0])
        samples_per_case = int(self.num_foreground_voxels_for_intensitystats // len(self.dataset))
        args = [(v["images"], v["label"], reader_writer_class, ignore_label, samples_per_case)
                for v in self.dataset.values()]
        with multiprocessing.get_context("spawn").Pool(self.num_processes) as pool:
            results = list(tqdm(pool.imap(_analyze_star, args), total=len(args),
                                desc="Extracting ignore-aware dataset fingerprint",
                                disable=not self.show_progress_bar))

        num_channels = len(self.dataset_json["channel_names"])
        statistics = {}
        for c in range(num_channels):
            values = np.concatenate([r[2][c] for r in results])
            if values.size == 0:
                raise ValueError(
                    f"{self.dataset_name}: no annotated foreground voxel in any training case "
                    f"(all labels are background or ignore), so intensity statistics cannot be computed."
                )
            low, median, high = np.percentile(values, PERCENTILES)
            statistics[c] = {
                "mean": float(values.mean()), "median": float(median), "std": float(values.std()),
                "min": float(values.min()), "max": float(values.max()),
                "percentile_99_5": float(high), "percentile_00_5": float(low),
            }
        fingerprint = {
            "spacings": [r[1] for r in results],
            "shapes_after_crop": [r[0] for r in results],
            "foreground_intensity_properties_per_channel": statistics,
            "median_relative_size_after_cropping": float(np.median([r[3] for r in results])),
        }
        write_json_atomic(_jsonable(fingerprint), output_file)
        return fingerprint


def _analyze_star(args):
    return analyze_case_ignore_aware(*args)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
