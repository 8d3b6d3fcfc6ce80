"""The package installs with pip and works from outside the repository (marked ``slow``: it builds a wheel).

The build runs offline (``--no-deps --no-build-isolation``, with the test environment's setuptools) on a copy
of the source tree, so that the checkout gets no ``build/`` or ``*.egg-info``. The installed copy is then used
from a scratch working directory with only the install folder on ``PYTHONPATH``: whatever it needs must have
been installed, not picked up from the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "tiny-models", "outputs", ".venv")
INSTALL_TIMEOUT_S = 600  # a build of a few files: seconds normally; generous for a busy machine


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `pip install --target` of this repository (package, data files, console script)."""
    work = tmp_path_factory.mktemp("packaging")
    source, target = work / "source", work / "site"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index"]
    offline = ["--no-deps", "--no-build-isolation", "--target", str(target), str(source)]
    subprocess.run([*pip, *offline], check=True, timeout=INSTALL_TIMEOUT_S, capture_output=True, text=True)
    return target


def _run_outside(installed: Path, tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` in a scratch folder with only the installed copy importable (not the repository)."""
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
    )


def test_the_installed_package_imports_from_outside_the_repository_and_finds_its_vocabulary(
    installed: Path, tmp_path: Path
) -> None:
    code = (
        "import photomaker, photomaker.testing as t; "
        "print(photomaker.__file__); print(len(t.clip_tokenizer())); print(photomaker.__version__)"
    )
    result = _run_outside(installed, tmp_path, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    module_file, vocabulary_size, version = result.stdout.split()[-3:]
    assert Path(module_file).is_relative_to(installed), f"photomaker was imported from {module_file}"
    assert int(vocabulary_size) == 49408  # the bundled CLIP BPE file was installed and read
    assert (installed / "photomaker" / "data" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    # the data the commands read: eval's 40 prompts, train's DeepSpeed example config
    assert (installed / "photomaker" / "data" / "eval_prompts.txt").is_file()
    assert (installed / "photomaker" / "train" / "config" / "deepspeed_zero2.yaml").is_file()
    assert not (installed / "style_template.py").exists() and not (installed / "app.py").exists()
    assert version == __import__("photomaker").__version__


def test_the_photomaker_console_script_is_the_module_cli(installed: Path, tmp_path: Path) -> None:
    script = _run_outside(installed, tmp_path, str(installed / "bin" / "photomaker"), "--help")
    module = _run_outside(installed, tmp_path, sys.executable, "-m", "photomaker", "--help")
    assert script.returncode == 0, script.stderr
    assert module.returncode == 0, module.stderr
    # The same parser: everything after the usage paragraph (which may name the program differently) is equal.
    assert script.stdout.split("\n\n", 1)[1] == module.stdout.split("\n\n", 1)[1]
    assert "generate" in script.stdout


def test_test_support_is_installed_under_its_own_name(installed: Path) -> None:
    """The --tiny app imports the fault-injection hook from the package; nothing else test-only is installed."""
    assert (installed / "photomaker" / "testsupport" / "fault_injection.py").is_file()
    assert not (installed / "photomaker" / "fault_injection.py").exists()
    assert not (installed / "photomaker" / "lowvram.py").exists()
    assert not (installed / "bench").exists() and not (installed / "tests").exists()
