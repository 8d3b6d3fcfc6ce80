"""Shared test setup: offline Hub, markers by test file, the tiny models (built once per session) and tokenizers.

Markers (registered in pyproject.toml) are assigned here, so that no test file carries its own:

- ``app``: the test starts the Gradio app (it uses the ``app_server`` or ``robust_server`` fixture);
- ``browser``, ``load``, ``slow``: every test of the files listed in ``MARKERS_BY_FILE``;
- ``unit``: every test that got none of the above (in-process, a fraction of a second each).

``bash tests/run.sh -m unit`` runs the fast subset; ``-m "not app and not browser and not load"`` every in-process
test; CI runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MARKERS_BY_FILE: dict[str, tuple[str, ...]] = {
    "test_app_browser.py": ("browser",),
    "test_load.py": ("load",),
    "test_faults.py": ("load",),
    "test_robustness.py": ("load",),
    "test_safety.py": ("load",),
    # In-process, but seconds per test: whole tiny pipelines, the service, the CLI, packaging, benchmarks.
    "test_pipeline.py": ("slow",),
    "test_service.py": ("slow",),
    "test_batch.py": ("slow",),
    "test_cli.py": ("slow",),
    "test_loading.py": ("slow",),
    "test_testing_models.py": ("slow",),
    "test_readme.py": ("slow",),
    "test_bench.py": ("slow",),
    "test_packaging.py": ("slow",),
    # Measured with --durations on the shared 2-core machine (10-60 s per file, several seconds per test): tiny
    # training and eval runs, the reference's snippets, the field table across app and CLI, the control
    # pipelines and service, the face-checked service, the control models. The other new files (train data, face
    # transforms, control images, bench_train, structure, architecture) take a second or less per test: unit.
    "test_cli_commands.py": ("slow",),
    "test_evaluation.py": ("slow",),
    "test_train.py": ("slow",),
    "test_reference_snippets.py": ("slow",),
    "test_fields.py": ("slow",),
    "test_pipeline_control.py": ("slow",),
    "test_pipeline_img2img.py": ("slow",),
    "test_pipeline_inpaint.py": ("slow",),
    "test_pipeline_ip_adapter.py": ("slow",),
    "test_service_control.py": ("slow",),
    "test_bench_control.py": ("slow",),
    "test_faces_service.py": ("slow",),
    "test_control_models.py": ("slow",),
}
APP_FIXTURES = frozenset({"app_server", "robust_server"})
NON_UNIT_MARKERS = ("app", "browser", "load", "slow")

# Before anything imports huggingface_hub: without it a Hub call retries for ~20 s before failing offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ``base/`` (tiny SDXL pipeline), ``photomaker-v1.bin`` and ``photomaker-v2.bin``."""
    from photomaker.testing import make_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    make_tiny(root)
    return root


@pytest.fixture
def clip_tokenizer():
    """SDXL's first tokenizer (pads with <|endoftext|>), real CLIP vocabulary; fresh per test (add_tokens mutates)."""
    from photomaker.testing import clip_tokenizer as build

    return build()


@pytest.fixture
def clip_tokenizer_2():
    """SDXL's second tokenizer: same vocabulary, pads with '!' (id 0)."""
    from photomaker.testing import clip_tokenizer as build

    return build(pad_token="!")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its file and the fixtures it uses (see the module docstring)."""
    for item in items:
        for name in MARKERS_BY_FILE.get(item.path.name, ()):
            item.add_marker(name)
        if APP_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("app")
        if not any(item.get_closest_marker(name) for name in NON_UNIT_MARKERS):
            item.add_marker("unit")
