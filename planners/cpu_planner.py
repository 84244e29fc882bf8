"""Small plans for CPU benchmarks: nnU-Net's planner at half the resolution, with a capped batch.

Full-resolution plans make 2D ACDC cost about 3 s per iteration on 2 CPU cores; at half the
in-plane resolution (e.g. 2.97 mm for ACDC), patch 128x112 and batch 8, an iteration takes about
0.65 s and scribbles survive the down-sampling (``../shared/NNUNET_NOTES.md``). Everything else is
nnU-Net's planning; the plans are ordinary nnU-Net plans named ``nnUNetPlansCPU`` (pass
``-p nnUNetPlansCPU`` to ``nnUNetv2_train`` / ``nnUNetv2_predict`` / ``nnunet-weak compare``).
"""
from __future__ import annotations

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


class nnUNetPlannerCPU(ExperimentPlanner):
    """ExperimentPlanner with the target spacing coarsened by ``SPACING_FACTOR`` in-plane and
    batches capped at ``MAX_BATCH_SIZE``."""

    SPACING_FACTOR = 2.0
    MAX_BATCH_SIZE = 8

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlansCPU",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def determine_fullres_target_spacing(self) -> np.ndarray:
        """nnU-Net's target spacing, coarser in-plane: every axis but a clearly thicker slice axis."""
        spacing = np.array(super().determine_fullres_target_spacing(), dtype=float)
        in_plane = np.ones(len(spacing), bool)
        thickest = int(np.argmax(spacing))
        if spacing[thickest] > 2 * np.min(spacing):
            in_plane[thickest] = False
        spacing[in_plane] *= self.SPACING_FACTOR
        return spacing

    def get_plans_for_configuration(self, *args, **kwargs) -> dict:
        plan = super().get_plans_for_configuration(*args, **kwargs)
        plan["batch_size"] = int(min(plan["batch_size"], self.MAX_BATCH_SIZE))
        return plan
