"""Which control models to use, and loading each one lazily, once, on the pipeline's device and dtype.

Each model has a default Hub id, overridable by argument (``ControlModelRegistry(overrides=...)``) or by an
environment variable (a Hub id or a local folder, e.g. a copy made with ``hf download ID --local-dir DIR``).
Nothing is downloaded until a request needs that model; offline failures name the model, the variable to set
and the cause (``HF_HUB_OFFLINE`` or no network).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from photomaker.control_images import DepthEstimator, PersonDetector, PoseEstimator
from photomaker.errors import ControlModelUnavailableError, InvalidRequestError

logger = logging.getLogger(__name__)

ModelKind = Literal["controlnet", "t2i_adapter", "ip_adapter", "pose_estimator", "person_detector", "depth_estimator"]
NO_MODEL = "none"
"""Value of an override or variable that turns an optional model off (only the person detector is optional)."""


@dataclass(frozen=True)
class ControlModelSpec:
    """One configurable model: what it is for, its default, and the environment variable that overrides it."""

    key: str
    kind: ModelKind
    default_id: str
    env_var: str
    description: str


CONTROL_MODEL_SPECS: dict[str, ControlModelSpec] = {
    spec.key: spec
    for spec in (
        ControlModelSpec(
            "pose", "controlnet", "thibaud/controlnet-openpose-sdxl-1.0", "PHOTOMAKER_CONTROLNET_POSE",
            "pose ControlNet",
        ),
        ControlModelSpec(
            "canny", "controlnet", "diffusers/controlnet-canny-sdxl-1.0", "PHOTOMAKER_CONTROLNET_CANNY",
            "edge (canny) ControlNet",
        ),
        ControlModelSpec(
            "depth", "controlnet", "diffusers/controlnet-depth-sdxl-1.0", "PHOTOMAKER_CONTROLNET_DEPTH",
            "depth ControlNet",
        ),
        ControlModelSpec(
            "sketch", "t2i_adapter", "TencentARC/t2i-adapter-sketch-sdxl-1.0", "PHOTOMAKER_T2I_SKETCH",
            "sketch T2I-Adapter",
        ),
        ControlModelSpec(
            "ip_adapter", "ip_adapter", "h94/IP-Adapter", "PHOTOMAKER_IP_ADAPTER", "style IP-Adapter"
        ),
        ControlModelSpec(
            "pose_estimator", "pose_estimator", "usyd-community/vitpose-base-simple", "PHOTOMAKER_POSE_MODEL",
            "pose estimator (ViTPose)",
        ),
        ControlModelSpec(
            # The detector ViTPose's documentation pairs it with; COCO label 0 is "person".
            "person_detector", "person_detector", "PekingU/rtdetr_r50vd_coco_o365", "PHOTOMAKER_PERSON_DETECTOR",
            "person detector",
        ),
        ControlModelSpec(
            # diffusers/controlnet-depth-sdxl-1.0 was trained on DPT-hybrid MiDaS maps.
            "depth_estimator", "depth_estimator", "Intel/dpt-hybrid-midas", "PHOTOMAKER_DEPTH_MODEL",
            "depth estimator",
        ),
    )
}  # fmt: skip
IP_ADAPTER_SUBFOLDER = "sdxl_models"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_sdxl.bin"


@dataclass(frozen=True)
class IPAdapterSource:
    """Where ``pipe.load_ip_adapter(**source.load_kwargs())`` finds the IP-Adapter weights."""

    location: str
    subfolder: str
    weight_name: str

    def load_kwargs(self) -> dict[str, str]:
        return {
            "pretrained_model_name_or_path_or_dict": self.location,
            "subfolder": self.subfolder,
            "weight_name": self.weight_name,
        }


def resolve_model_id(key: str, override: str | os.PathLike[str] | None = None) -> str:
    """The id or folder to load for ``key``: the argument, else its environment variable, else the default."""
    spec = _spec(key)
    if override is not None and str(override).strip():
        return str(override)
    from_env = os.environ.get(spec.env_var, "").strip()
    return from_env or spec.default_id


def resolve_ip_adapter(override: str | os.PathLike[str] | None = None) -> IPAdapterSource:
    """The IP-Adapter's location: a Hub id or folder (weights in ``sdxl_models/``, else at its top), or a file."""
    location = resolve_model_id("ip_adapter", override)
    path = Path(location).expanduser()
    if path.is_file():
        return IPAdapterSource(str(path.parent), "", path.name)
    if path.is_dir() and not (path / IP_ADAPTER_SUBFOLDER / IP_ADAPTER_WEIGHT_NAME).is_file():
        return IPAdapterSource(str(path), "", IP_ADAPTER_WEIGHT_NAME)
    return IPAdapterSource(str(path) if path.is_dir() else location, IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (read at call time, so tests and users can toggle it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def unavailable_error(key: str, model_id: str, exc: BaseException) -> ControlModelUnavailableError:
    """The typed error for a model that could not be loaded: which one, why, and how to point at a copy."""
    spec = _spec(key)
    if _looks_local(model_id) and not Path(model_id).expanduser().exists():
        cause = f"the folder '{model_id}' does not exist"
        fix = f"point {spec.env_var} (or the override) at a folder with the model's config and weights"
    elif _looks_local(model_id):
        cause = f"the local folder '{model_id}' does not hold a loadable {spec.description}"
        fix = f"point {spec.env_var} at a folder with the model's config and weights"
    elif hub_offline():
        cause = "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is used and it does not hold it"
        fix = (
            f"download '{model_id}' once with network access (unset HF_HUB_OFFLINE), or copy it to a folder "
            f"and set {spec.env_var}=/path/to/that/folder"
        )
    else:
        cause = "it is neither in the local cache nor reachable on the Hub (no network, wrong id, or gated)"
        fix = f"check the network and the id, or copy the model to a folder and set {spec.env_var}=/path/to/it"
    if key == "person_detector":
        fix += f" (or set {spec.env_var}={NO_MODEL} to take the whole photo as the person's box)"
    return ControlModelUnavailableError(
        f"Could not load the {spec.description} '{model_id}': {cause} ({type(exc).__name__}: {exc}). Fix: {fix}."
    )


class ControlModelRegistry:
    """Loads each control model on first use, keeps it, and moves the loaded ones with the pipeline.

    Thread-safe: concurrent first requests for one model load it once, while models already loaded stay
    available (a multi-GB download of one does not hold up requests for another). ``to(device, dtype)`` moves
    every loaded model and sets where later ones load, a load in progress included; call it whenever the
    pipeline moves (offload included).
    """

    def __init__(
        self,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        overrides: dict[str, str | os.PathLike[str]] | None = None,
    ):
        unknown = sorted(set(overrides or {}) - set(CONTROL_MODEL_SPECS))
        if unknown:
            raise InvalidRequestError(f"unknown control model key(s) {unknown}; use {', '.join(CONTROL_MODEL_SPECS)}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.overrides = dict(overrides or {})
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()
        """Guards ``_models``, ``_loading``, ``device`` and ``dtype``; never held while a model loads."""
        self._loading: dict[str, threading.Lock] = {}
        """One lock per key, held while that model loads, so that concurrent first requests load it once."""
        self._ip_adapter_lock = threading.Lock()
        """Held while an IP-Adapter loads into a pipeline, so that two first requests do not both load it."""

    def model_id(self, key: str) -> str:
        return resolve_model_id(key, self.overrides.get(key))

    def ip_adapter_source(self) -> IPAdapterSource:
        return resolve_ip_adapter(self.overrides.get("ip_adapter"))

    def loaded(self) -> tuple[str, ...]:
        """Keys of the models loaded so far, in loading order."""
        return tuple(self._models)

    def load_ip_adapter(self, pipe: Any, scale: float | None = None) -> None:
        """Load the IP-Adapter into ``pipe`` (once: a pipeline that has one keeps it), optionally set its scale.

        The IP-Adapter lives inside the pipeline (its UNet's attention processors and image encoder), so it is
        loaded with diffusers' ``pipe.load_ip_adapter`` rather than kept here.
        """
        with self._ip_adapter_lock:
            if getattr(pipe.unet, "encoder_hid_proj", None) is None:
                source = self.ip_adapter_source()
                logger.info("Loading the IP-Adapter %s", source)
                try:
                    pipe.load_ip_adapter(**source.load_kwargs(), **_hub_kwargs())
                except (OSError, ValueError) as exc:
                    raise unavailable_error("ip_adapter", source.location, exc) from exc
            if scale is not None:
                pipe.set_ip_adapter_scale(scale)

    def control_model(self, control_type: str) -> torch.nn.Module:
        """The ControlNet ("pose", "canny", "depth") or T2I-Adapter ("sketch") for a control type."""
        spec = _spec(control_type)
        if spec.kind not in ("controlnet", "t2i_adapter"):
            raise InvalidRequestError(f"{control_type!r} is not a control type; use pose, canny, depth or sketch")
        return self._get(control_type)

    def pose_estimator(self) -> PoseEstimator:
        """ViTPose with the person detector, or without one (whole-photo box) when that is set to "none"."""
        detector = None if self.model_id("person_detector").lower() == NO_MODEL else self._get("person_detector")
        estimator = self._get("pose_estimator")
        with self._lock:
            estimator.detector = detector
        return estimator

    def depth_estimator(self) -> DepthEstimator:
        return self._get("depth_estimator")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ControlModelRegistry:
        """Move every loaded model (and future loads) to ``device`` / ``dtype``."""
        with self._lock:
            self.device = torch.device(device)
            self.dtype = dtype or self.dtype
            for model in self._models.values():
                model.to(self.device, self.dtype)
        return self

    def _get(self, key: str) -> Any:
        with self._lock:
            if key in self._models:
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:  # another thread loaded it while this one waited
                    return self._models[key]
                dtype = self.dtype
            model_id = self.model_id(key)
            logger.info("Loading the %s from %s", _spec(key).description, model_id)
            try:
                model = _LOADERS[_spec(key).kind](model_id, dtype)
            except (OSError, ValueError) as exc:  # missing files, offline cache misses, bad configs
                raise unavailable_error(key, model_id, exc) from exc
            with self._lock:  # where the registry is now: a to() during the load counts
                model.to(self.device, self.dtype)
                self._models[key] = model
            return model


def _hub_kwargs() -> dict[str, Any]:
    return {"local_files_only": True} if hub_offline() else {}


def _load_controlnet(model_id: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(model_id, torch_dtype=dtype, **_hub_kwargs())


def _load_t2i_adapter(model_id: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import T2IAdapter

    return T2IAdapter.from_pretrained(model_id, torch_dtype=dtype, **_hub_kwargs())


def _load_pose_estimator(model_id: str, dtype: torch.dtype) -> PoseEstimator:
    from transformers import AutoImageProcessor, VitPoseForPoseEstimation

    processor = AutoImageProcessor.from_pretrained(model_id, **_hub_kwargs())
    model = VitPoseForPoseEstimation.from_pretrained(model_id, dtype=dtype, **_hub_kwargs())
    return PoseEstimator(model.eval(), processor)


def _load_person_detector(model_id: str, dtype: torch.dtype) -> PersonDetector:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    processor = AutoImageProcessor.from_pretrained(model_id, **_hub_kwargs())
    model = AutoModelForObjectDetection.from_pretrained(model_id, dtype=dtype, **_hub_kwargs())
    return PersonDetector(model.eval(), processor)


def _load_depth_estimator(model_id: str, dtype: torch.dtype) -> DepthEstimator:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(model_id, **_hub_kwargs())
    model = AutoModelForDepthEstimation.from_pretrained(model_id, dtype=dtype, **_hub_kwargs())
    return DepthEstimator(model.eval(), processor)


_LOADERS = {
    "controlnet": _load_controlnet,
    "t2i_adapter": _load_t2i_adapter,
    "pose_estimator": _load_pose_estimator,
    "person_detector": _load_person_detector,
    "depth_estimator": _load_depth_estimator,
}


def _spec(key: str) -> ControlModelSpec:
    try:
        return CONTROL_MODEL_SPECS[key]
    except KeyError:
        raise InvalidRequestError(
            f"unknown control model {key!r}; use one of {', '.join(CONTROL_MODEL_SPECS)}"
        ) from None


def _looks_local(model_id: str) -> bool:
    """Paths, not Hub ids: absolute, relative with ./ or ~, or an existing folder."""
    return model_id.startswith(("/", ".", "~")) or Path(model_id).expanduser().exists()
