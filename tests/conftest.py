"""Shared fixtures: isolated nnU-Net folders, tiny phantom datasets."""
from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_weak.environment import NNUNET_FOLDERS


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch) -> dict[str, Path]:
    """Fresh nnUNet_raw / _preprocessed / _results under tmp_path, set in the environment."""
    folders = {}
    for name in NNUNET_FOLDERS:
        folders[name] = tmp_path / name
        folders[name].mkdir()
        monkeypatch.setenv(name, str(folders[name]))
    monkeypatch.delenv("NNUNET_WEAK_BUDGET", raising=False)
    return folders


def subprocess_env(folders: dict[str, Path], **extra: str) -> dict[str, str]:
    """Environment for stock nnU-Net commands run as subprocesses on 2 CPU cores."""
    from nnunet_weak.environment import environment_with_trainers
    env = environment_with_trainers()
    env.update({k: str(v) for k, v in folders.items()})
    env.update({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2", "OMP_NUM_THREADS": "2"})
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def repository_root() -> Path:
    return Path(__file__).resolve().parents[1]

