"""The command line: --help everywhere, the environment lines, clear errors for bad input."""
import os
import subprocess
import sys

import pytest

from nnunet_weak.cli import main
from nnunet_weak.environment import trainers_folder

SUBCOMMANDS = [["env"], ["plan_and_preprocess"], ["convert"], ["convert", "phantom"], ["convert", "acdc"],
               ["convert", "la"], ["convert", "chaos"], ["convert", "folders"], ["evaluate"],
               ["compare"], ["demo"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(words + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: nnunet-weak" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "nnunet_weak.cli", "--help"], capture_output=True, encoding="utf-8")
    assert out.returncode == 0 and "plan_and_preprocess" in out.stdout


def test_env_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/somewhere/else")
    assert main(["env", "--root", str(tmp_path)]) == 0
    lines = dict(line[len("export "):].split("=", 1) for line in capsys.readouterr().out.splitlines()
                 if line.startswith("export "))
    assert lines["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
    assert lines["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    ext = lines["nnUNet_extTrainer"].split(":")
    assert ext == [str(trainers_folder()), "/somewhere/else"]
    assert (trainers_folder() / "nnUNetWeakTrainer.py").is_file()


def _error_of(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_missing_environment_is_explained(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    err = _error_of(["convert", "phantom"], capsys)
    assert "nnUNet_raw is not set" in err and "nnunet-weak env" in err


def test_dataset_without_dataset_json(nnunet_folders, capsys):
    (nnunet_folders["nnUNet_raw"] / "Dataset777_Broken" / "labelsTr").mkdir(parents=True)
    err = _error_of(["plan_and_preprocess", "-d", "777"], capsys)
    assert "has no dataset.json" in err
    assert not any(nnunet_folders["nnUNet_preprocessed"].iterdir())


def test_unknown_dataset_id(nnunet_folders, capsys):
    err = _error_of(["evaluate", "-d", "778", "-i", "nowhere"], capsys)
    assert "No dataset with id 778" in err


def test_unknown_trainer_and_budget(nnunet_folders, capsys):
    err = _error_of(["compare", "--dense", "1", "--sparse", "2", "--trainers", "NoSuchTrainer"], capsys)
    assert "No trainer named 'NoSuchTrainer'" in err and "nnUNetWeakTrainer" in err
    assert "ScribbleAttentionTrainer_noCRF" in err  # variants are listed, not only modules
    err = _error_of(["compare", "--dense", "1", "--sparse", "2", "--budget", "forever"], capsys)
    assert "Unknown budget 'forever'" in err
    err = _error_of(["compare", "--sparse", "2", "--no_dense", "--trainers", "nnUNetWeakTrainer",
                     "--baseline", "ScribbleAttentionTrainer"], capsys)
    assert "baseline 'ScribbleAttentionTrainer' is not one of the trainers" in err


def test_tables_print_in_an_ascii_locale():
    """A terminal whose locale cannot encode ± gets a stand-in character, not a crash (CI's locale is ASCII)."""
    env = dict(os.environ, PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LC_ALL="C", LANG="C")
    code = ("import nnunet_weak.cli as cli; cli._cmd_env = lambda args: print('0.848 \\u00b1 0.010'); "
            "raise SystemExit(cli.main(['env']))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.strip() == b"0.848 ? 0.010"
