"""The one-person check reaches the user through the service (which the app, the CLI and /generate share)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faces_fixtures import ASTRONAUT, GRACE_HOPPER
from PIL import Image

from photomaker.service import GenerationRequest, PhotoMakerService, ServiceConfig


@pytest.fixture(scope="module")
def service(tiny_models_dir: Path) -> PhotoMakerService:
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="dlib", device="cpu"))
    service.wait_ready(timeout=300)
    service.pipeline.set_progress_bar_config(disable=True)
    return service


def _request(**fields) -> GenerationRequest:
    return GenerationRequest(
        prompt="a photo of a woman img", width=64, height=64, num_steps=1, num_outputs=1, seed=3, **fields
    )


def _mismatch_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "look like the same person" in w]


def test_photos_of_two_people_are_used_with_a_warning_naming_them(service: PhotoMakerService) -> None:
    result = service.generate(_request(id_images=[GRACE_HOPPER, ASTRONAUT]))
    assert len(result.images) == 1 and len(result.crops) == 2  # not refused
    (warning,) = _mismatch_warnings(result.warnings)
    assert warning.startswith("photo 1 (grace_hopper.jpg) and photo 2 (astronaut.png) do not look like the same")


def test_one_person_or_a_deliberate_mix_gets_no_such_warning(service: PhotoMakerService) -> None:
    mirrored = Image.open(GRACE_HOPPER).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert _mismatch_warnings(service.generate(_request(id_images=[GRACE_HOPPER, mirrored])).warnings) == []
    mix = service.generate(_request(id_images=[GRACE_HOPPER], mix_images=[ASTRONAUT], mix_strength=0.5))
    assert _mismatch_warnings(mix.warnings) == []  # two people on purpose: each person is checked on their own
