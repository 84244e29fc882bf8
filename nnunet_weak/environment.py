"""nnU-Net's folders and the environment a user sets so that stock commands find this project."""
from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

from nnunet_weak.errors import UserInputError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainers_folder() -> Path:
    """The folder of the project's trainers, the one to name in ``nnUNet_extTrainer``."""
    spec = importlib.util.find_spec("nnunet_weak.trainers")
    return Path(spec.submodule_search_locations[0]).resolve()


def required_folder(name: str) -> Path:
    """The folder named by the nnU-Net environment variable ``name``; a clear error if unset."""
    value = os.environ.get(name)
    if not value:
        raise UserInputError(
            f"The environment variable {name} is not set. Run `eval \"$(nnunet-weak env)\"` "
            f"(or add the lines `nnunet-weak env` prints to your shell profile)."
        )
    return Path(value)


def ext_trainer_value(existing: str | None) -> str:
    """``nnUNet_extTrainer`` with the project's trainers folder first, other entries kept."""
    ours = str(trainers_folder())
    entries = [p for p in (existing or "").split(os.pathsep) if p and p != ours]
    return os.pathsep.join([ours] + entries)


def environment_with_trainers(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: ``os.environ``) in which nnU-Net finds the project's trainers."""
    env = dict(os.environ if env is None else env)
    env["nnUNet_extTrainer"] = ext_trainer_value(env.get("nnUNet_extTrainer"))
    return env


def export_lines(root: str | None, has_gpu: bool, cpu_count: int) -> list[str]:
    """The ``export`` lines ``nnunet-weak env`` prints.

    Folders already set in the environment are kept unless ``root`` is given (then all three go under
    it); unset folders go under ``root`` (default ``~/nnUNet_data``). Values are shell-quoted, so
    that a path with a space survives ``eval``. On a machine without a GPU the data-augmentation
    and default worker counts are set to the number of cores, since nnU-Net's defaults (12 and 8)
    assume a GPU server.
    """
    base = Path(root).expanduser().resolve() if root else Path("~/nnUNet_data").expanduser()
    lines = []
    for name in NNUNET_FOLDERS:
        value = os.environ.get(name) if root is None else None
        lines.append(f"export {name}={shlex.quote(str(value or base / name))}")
    lines.append(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value(os.environ.get('nnUNet_extTrainer')))}")
    if not has_gpu:
        n = max(1, cpu_count)
        lines.append(f"export nnUNet_n_proc_DA={os.environ.get('nnUNet_n_proc_DA', n)}")
        lines.append(f"export nnUNet_def_n_proc={os.environ.get('nnUNet_def_n_proc', n)}")
    return lines


def project_trainer_names() -> list[str]:
    """Names of the trainer classes defined in the project's trainers folder (read, not imported)."""
    import ast
    names = []
    for module in trainers_folder().glob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        names += [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    return sorted(set(names) | {p.stem for p in trainers_folder().glob("*.py") if not p.stem.startswith("_")})


def find_trainer_class(name: str) -> type:
    """The trainer class ``nnUNetv2_train -tr name`` would use (nnU-Net's own trainers, then ours)."""
    import contextlib
    import io
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(previous)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise UserInputError(
            f"No trainer named '{name}'. The project's trainers: {', '.join(project_trainer_names())}; "
            f"nnU-Net's own are in nnunetv2/training/nnUNetTrainer."
        ) from None
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script (``nnUNetv2_train`` ...): the one installed beside this
    Python first (a virtual environment need not be activated), else the one on PATH."""
    import shutil
    import sys
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UserInputError(f"The nnU-Net command {name} is not installed; install nnunetv2 "
                             f"(`pip install -e .` in this project does) and activate its environment.")
    return found
