"""The README's offline Python example must run as written (on the tiny models, in a scratch folder)."""

import os
import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no python block after <!-- {marker} -->"
    return match.group(1)


def test_offline_python_example_runs(tmp_path, monkeypatch):
    code = readme_block("offline-example")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    image = namespace["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert os.path.isfile(tmp_path / "tiny-models" / "photomaker-v1.bin")
