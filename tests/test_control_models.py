"""Control models: ids (argument > environment > default), lazy loading and caching, device/dtype, offline errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter

from photomaker.control_images import DepthEstimator, PoseEstimator
from photomaker.control_models import (
    CONTROL_MODEL_SPECS,
    ControlModelRegistry,
    IPAdapterSource,
    resolve_ip_adapter,
    resolve_model_id,
)
from photomaker.errors import ControlModelUnavailableError, InvalidRequestError
from photomaker.testing import tiny_controlnet, tiny_sdxl_components
from photomaker.testing_control import save_tiny_controlnet, save_tiny_t2i_adapter


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    return save_tiny_controlnet(tmp_path_factory.mktemp("controlnet"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return save_tiny_t2i_adapter(tmp_path_factory.mktemp("adapter"))


@pytest.fixture(autouse=True)
def no_override_variables(monkeypatch):
    for spec in CONTROL_MODEL_SPECS.values():
        monkeypatch.delenv(spec.env_var, raising=False)


def test_defaults_and_their_environment_variables():
    expected = {
        "pose": ("thibaud/controlnet-openpose-sdxl-1.0", "PHOTOMAKER_CONTROLNET_POSE"),
        "canny": ("diffusers/controlnet-canny-sdxl-1.0", "PHOTOMAKER_CONTROLNET_CANNY"),
        "depth": ("diffusers/controlnet-depth-sdxl-1.0", "PHOTOMAKER_CONTROLNET_DEPTH"),
        "sketch": ("TencentARC/t2i-adapter-sketch-sdxl-1.0", "PHOTOMAKER_T2I_SKETCH"),
        "ip_adapter": ("h94/IP-Adapter", "PHOTOMAKER_IP_ADAPTER"),
        "pose_estimator": ("usyd-community/vitpose-base-simple", "PHOTOMAKER_POSE_MODEL"),
        "person_detector": ("PekingU/rtdetr_r50vd_coco_o365", "PHOTOMAKER_PERSON_DETECTOR"),
        "depth_estimator": ("Intel/dpt-hybrid-midas", "PHOTOMAKER_DEPTH_MODEL"),
    }
    assert {key: (spec.default_id, spec.env_var) for key, spec in CONTROL_MODEL_SPECS.items()} == expected
    assert resolve_ip_adapter() == IPAdapterSource("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.bin")


def test_argument_beats_environment_beats_default(monkeypatch):
    assert resolve_model_id("canny") == "diffusers/controlnet-canny-sdxl-1.0"
    monkeypatch.setenv("PHOTOMAKER_CONTROLNET_CANNY", "/models/canny")
    assert resolve_model_id("canny") == "/models/canny"
    assert resolve_model_id("canny", "me/my-canny") == "me/my-canny"
    with pytest.raises(InvalidRequestError, match="unknown control model 'scribble'"):
        resolve_model_id("scribble")
    with pytest.raises(InvalidRequestError, match="unknown control model key"):
        ControlModelRegistry(overrides={"scribble": "x"})


def test_ip_adapter_from_a_file_or_a_folder(tmp_path, monkeypatch):
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(b"")
    assert resolve_ip_adapter(weights) == IPAdapterSource(str(tmp_path), "", "style.safetensors")
    monkeypatch.setenv("PHOTOMAKER_IP_ADAPTER", str(tmp_path))
    assert resolve_ip_adapter() == IPAdapterSource(str(tmp_path), "", "ip-adapter_sdxl.bin")
    (tmp_path / "sdxl_models").mkdir()
    (tmp_path / "sdxl_models" / "ip-adapter_sdxl.bin").write_bytes(b"")
    assert resolve_ip_adapter() == IPAdapterSource(str(tmp_path), "sdxl_models", "ip-adapter_sdxl.bin")


def test_controlnet_loads_once_from_a_local_folder_with_the_saved_weights(controlnet_dir):
    registry = ControlModelRegistry(overrides={"canny": controlnet_dir})
    assert registry.loaded() == ()
    controlnet = registry.control_model("canny")
    assert isinstance(controlnet, ControlNetModel)
    assert registry.control_model("canny") is controlnet and registry.loaded() == ("canny",)
    expected = tiny_controlnet(tiny_sdxl_components()["unet"]).state_dict()
    loaded = controlnet.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_adapter_from_an_environment_variable_follows_dtype_and_moves(adapter_dir, monkeypatch):
    monkeypatch.setenv("PHOTOMAKER_T2I_SKETCH", str(adapter_dir))
    registry = ControlModelRegistry(dtype=torch.bfloat16)
    adapter = registry.control_model("sketch")
    assert isinstance(adapter, T2IAdapter)
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    registry.to("cpu", torch.float32)
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    assert registry.dtype == torch.float32  # later loads follow too


def test_estimators_and_non_control_keys(tmp_path):
    from photomaker.testing_control import save_tiny_depth_model, save_tiny_pose_model

    registry = ControlModelRegistry(
        overrides={
            "pose_estimator": save_tiny_pose_model(tmp_path / "pose"),
            "person_detector": "none",
            "depth_estimator": save_tiny_depth_model(tmp_path / "depth"),
        }
    )
    assert isinstance(registry.pose_estimator(), PoseEstimator)
    assert isinstance(registry.depth_estimator(), DepthEstimator)
    assert registry.pose_estimator() is registry.pose_estimator()
    assert registry.pose_estimator().detector is None and registry.loaded() == ("pose_estimator", "depth_estimator")
    with pytest.raises(InvalidRequestError, match="not a control type"):
        registry.control_model("pose_estimator")


@pytest.mark.parametrize(
    ("key", "load", "env_var", "overrides"),
    [
        ("pose", lambda r: r.control_model("pose"), "PHOTOMAKER_CONTROLNET_POSE", {}),
        ("sketch", lambda r: r.control_model("sketch"), "PHOTOMAKER_T2I_SKETCH", {}),
        ("person_detector", lambda r: r.pose_estimator(), "PHOTOMAKER_PERSON_DETECTOR=none", {}),
        ("pose_estimator", lambda r: r.pose_estimator(), "PHOTOMAKER_POSE_MODEL", {"person_detector": "none"}),
        ("depth_estimator", lambda r: r.depth_estimator(), "PHOTOMAKER_DEPTH_MODEL", {}),
    ],
)
def test_offline_hub_ids_explain_themselves(key, load, env_var, overrides, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = ControlModelRegistry(overrides=overrides)
    with pytest.raises(ControlModelUnavailableError) as caught:
        load(registry)
    message = str(caught.value)
    assert CONTROL_MODEL_SPECS[key].default_id in message
    assert env_var in message and "HF_HUB_OFFLINE" in message
    assert registry.loaded() == ()  # a failed load is retried next time, not cached


def test_a_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-controlnet"
    with pytest.raises(ControlModelUnavailableError, match="PHOTOMAKER_CONTROLNET_DEPTH") as caught:
        ControlModelRegistry(overrides={"depth": missing}).control_model("depth")
    assert str(missing) in str(caught.value)


def test_ip_adapter_offline_explains_itself(monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from photomaker.testing import tiny_sdxl_components

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    with pytest.raises(ControlModelUnavailableError) as caught:
        ControlModelRegistry().load_ip_adapter(pipe)
    message = str(caught.value)
    assert "h94/IP-Adapter" in message and "PHOTOMAKER_IP_ADAPTER" in message and "HF_HUB_OFFLINE" in message


def _registry_with_a_person_detector(folder, labels):
    from photomaker.testing_control import save_tiny_person_detector, save_tiny_pose_model

    return ControlModelRegistry(
        overrides={
            "pose_estimator": save_tiny_pose_model(folder / "pose"),
            "person_detector": save_tiny_person_detector(folder / "detector", labels=labels),
        }
    )


def test_pose_estimator_uses_only_the_detector_s_person_boxes(tmp_path):
    from PIL import Image

    from photomaker.control_images import PersonDetector

    registry = _registry_with_a_person_detector(tmp_path, labels=("person", "car"))
    estimator = registry.pose_estimator()
    assert isinstance(estimator.detector, PersonDetector)
    assert registry.loaded() == ("person_detector", "pose_estimator")
    detector = estimator.detector
    detector.threshold = 0.0  # random weights: keep every query, then check only people are kept
    photo = Image.new("RGB", (80, 60), (120, 90, 60))
    inputs = detector.processor(images=photo, return_tensors="pt")
    with torch.inference_mode():
        outputs = detector.model(pixel_values=inputs["pixel_values"])
    raw = detector.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(60, 80)])[0]
    person_boxes = [box for box, label in zip(raw["boxes"].tolist(), raw["labels"].tolist(), strict=True) if label == 0]
    assert 0 < len(person_boxes) < len(raw["labels"])
    boxes = detector.detect(photo)
    assert sorted(boxes) == sorted(tuple(box) for box in person_boxes)
    assert len(estimator.estimate(photo)) == len(person_boxes)


def test_a_detector_without_a_person_class_is_refused(tmp_path):
    registry = _registry_with_a_person_detector(tmp_path, labels=("car", "bus"))
    with pytest.raises(ControlModelUnavailableError, match="has no 'person' class"):
        registry.pose_estimator()


def test_ip_adapter_loads_into_a_pipeline_once_and_takes_its_scale(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from photomaker.testing import tiny_sdxl_components
    from photomaker.testing_control import save_tiny_ip_adapter

    registry = ControlModelRegistry(overrides={"ip_adapter": save_tiny_ip_adapter(tmp_path / "ip")})
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    registry.load_ip_adapter(pipe, scale=0.7)
    projection = pipe.unet.encoder_hid_proj
    assert projection is not None and pipe.image_encoder is not None
    ip_processors = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "scale")]
    assert ip_processors and all(p.scale == [0.7] for p in ip_processors)
    registry.load_ip_adapter(pipe, scale=0.3)
    assert pipe.unet.encoder_hid_proj is projection  # kept, not loaded a second time
    assert all(p.scale == [0.3] for p in ip_processors)


def test_a_model_loading_holds_up_neither_loaded_models_nor_to_and_loads_once(controlnet_dir, adapter_dir, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from photomaker import control_models

    started, release = threading.Event(), threading.Event()
    loads = []
    load_adapter = control_models._LOADERS["t2i_adapter"]

    def slow_download(model_id, dtype):  # the real loader, after a wait standing in for a long download
        loads.append(model_id)
        started.set()
        assert release.wait(10)
        return load_adapter(model_id, dtype)

    monkeypatch.setitem(control_models._LOADERS, "t2i_adapter", slow_download)
    registry = ControlModelRegistry(overrides={"canny": controlnet_dir, "sketch": adapter_dir})
    canny = registry.control_model("canny")
    with ThreadPoolExecutor(3) as pool:
        adapters = [pool.submit(registry.control_model, "sketch") for _ in range(2)]
        assert started.wait(10)
        assert pool.submit(registry.control_model, "canny").result(timeout=5) is canny
        pool.submit(registry.to, "cpu", torch.bfloat16).result(timeout=5)
        release.set()
        first, second = (future.result(timeout=30) for future in adapters)
    assert first is second and loads == [str(adapter_dir)]
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}  # the move during its load applies
    assert {p.dtype for p in canny.parameters()} == {torch.bfloat16}


def test_two_first_requests_load_the_ip_adapter_into_a_pipeline_once(tmp_path):
    import threading
    import time

    from diffusers import StableDiffusionXLPipeline

    from photomaker.testing import tiny_sdxl_components
    from photomaker.testing_control import save_tiny_ip_adapter

    registry = ControlModelRegistry(overrides={"ip_adapter": save_tiny_ip_adapter(tmp_path / "ip")})
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    loads = []
    load_ip_adapter = pipe.load_ip_adapter

    def slow_load(*args, **kwargs):  # the real load, after a pause in which a second request arrives
        loads.append(kwargs["pretrained_model_name_or_path_or_dict"])
        time.sleep(0.3)
        return load_ip_adapter(*args, **kwargs)

    pipe.load_ip_adapter = slow_load
    threads = [threading.Thread(target=registry.load_ip_adapter, args=(pipe, 0.5)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(loads) == 1 and pipe.unet.encoder_hid_proj is not None
