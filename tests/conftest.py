"""Shared test setup: offline Hub, the tiny models (built once per session) and the real-vocabulary tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
