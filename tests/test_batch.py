"""Batch jobs: parsing and seeds, naming, atomic writes, resume, bad jobs, and 2 accelerate processes vs 1.

The model-free tests drive `photomaker.batch` with a stand-in generate function; the end-to-end ones run
`python -m photomaker batch` on the tiny models, once in this process and once under `accelerate launch`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from photomaker import batch
from photomaker.cli import main
from photomaker.errors import PromptError
from photomaker.metadata import read_parameters
from photomaker.service import GeneratedImage, GenerationRequest, GenerationResult

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_jobs(path: Path, lines: list[object]) -> Path:
    """A JSONL file; str items are written verbatim (to include broken lines), others as JSON."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def fake_generate(calls: list[GenerationRequest]):
    """Stands in for the service: a 64x64 image whose colour encodes the seed; records every request."""

    def generate(request: GenerationRequest) -> GenerationResult:
        calls.append(request)
        if "fail" in request.prompt:
            raise PromptError("the prompt has no class word before 'img'")
        colour = tuple(int(v) for v in np.random.default_rng(request.seed).integers(0, 256, 3))
        params = {"prompt": request.prompt, "seed": request.seed, "num_steps": request.num_steps}
        return GenerationResult([GeneratedImage(Image.new("RGB", (64, 64), colour), params)], request.seed)

    return generate


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    target = tmp_path / "photos" / "me.png"
    target.parent.mkdir()
    shutil.copy(EXAMPLES / "astronaut.png", target)
    return target


def test_jobs_resolve_relative_photos_and_bad_lines_say_what_is_wrong(tmp_path: Path, photo: Path) -> None:
    jobs_file = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "seed": 5},
            "",
            "{not json",
            {"id_images": ["photos/missing.png"], "prompt": "a woman img"},
            {"id_images": "photos/me.png", "prompt": "a woman img", "steps": 30},
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "num_outputs": 9},
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "num_steps": "30"},
        ],
    )
    jobs = batch.parse_jobs(jobs_file)

    assert [job.line for job in jobs] == [1, 3, 4, 5, 6, 7]  # blank line skipped, numbering kept
    assert jobs[0].request.id_images == [str(photo)]
    assert jobs[0].output_names == ["job-0001-0.png", "job-0001-1.png"]  # the request's default: 2 outputs
    assert "invalid JSON" in jobs[1].error
    assert "photos/missing.png" in jobs[2].error and "not found" in jobs[2].error
    assert "'steps'" in jobs[3].error and "num_steps" in jobs[3].error
    assert "num_outputs" in jobs[4].error
    assert "'num_steps' must be int" in jobs[5].error
    assert all(job.request is None for job in jobs[1:])


def test_seed_comes_from_the_job_content_never_at_random(tmp_path: Path, photo: Path) -> None:
    jobs_file = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "num_steps": 30},
            '{"num_steps": 30,   "prompt": "a woman img", "id_images": ["photos/me.png"]}',
            {"id_images": ["photos/me.png"], "prompt": "a woman img at sea", "num_steps": 30},
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "seed": 1234},
        ],
    )
    first, reordered, other, explicit = batch.parse_jobs(jobs_file)
    again = batch.parse_jobs(jobs_file)[0]

    assert first.request.seed == reordered.request.seed == again.request.seed
    assert other.request.seed != first.request.seed
    assert explicit.request.seed == 1234


def test_outputs_use_seed_plus_k_are_named_by_job_and_a_bad_job_does_not_stop_the_rest(
    tmp_path: Path, photo: Path
) -> None:
    jobs_file = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "seed": 10, "num_outputs": 2},
            {"id_images": ["photos/me.png"], "prompt": "fail img", "seed": 3, "num_outputs": 2},
            {"id_images": ["photos/me.png"], "prompt": "a man img", "seed": 20, "num_outputs": 1},
            {"id_images": ["photos/me.png"], "prompt": "a man img", "seed": 30, "num_outputs": 2, "best_of": 3},
        ],
    )
    out = tmp_path / "out"
    out.mkdir()
    calls: list[GenerationRequest] = []
    work, _ = batch.remaining_work(batch.parse_jobs(jobs_file), out)
    report = batch.run_work(work, out, fake_generate(calls))

    names = ["job-0001-0.png", "job-0001-1.png", "job-0003-0.png", "job-0004-0.png", "job-0004-1.png"]
    assert sorted(os.listdir(out)) == names
    assert [read_parameters(out / name)["seed"] for name in names] == [10, 11, 20, 30, 33]
    assert all(call.num_outputs == 1 for call in calls)
    # The failing job stops at its first output instead of failing the same way twice; best-of-3 outputs
    # draw from disjoint candidate seeds (30-32 and 33-35), so they can never come out identical.
    assert [call.seed for call in calls] == [10, 11, 3, 20, 30, 33]
    assert report.failures == [{"line": 2, "error": "the prompt has no class word before 'img'", "type": "PromptError"}]


def test_a_write_killed_midway_leaves_no_file_that_counts_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import photomaker.metadata

    def crash_while_writing(image: Image.Image, path: Path, params: dict) -> None:
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(photomaker.metadata, "save_png", crash_while_writing)
    target = tmp_path / "job-0001-0.png"
    with pytest.raises(KeyboardInterrupt):
        batch.save_atomically(Image.new("RGB", (8, 8)), {}, target)
    assert os.listdir(tmp_path) == []


def test_shards_split_the_remaining_work_exactly_once() -> None:
    items = list(range(7))
    shards = [batch.shard(items, index, 3) for index in range(3)]
    assert sorted(itertools.chain.from_iterable(shards)) == items
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


# ---------------------------------------------------------------------------------------------------------------
# End to end on the tiny models
# ---------------------------------------------------------------------------------------------------------------

TINY_JOB = {"prompt": "a photo of a woman img", "num_steps": 2, "width": 64, "height": 64, "style": "(No style)"}


@pytest.fixture(scope="module")
def batch_case(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three jobs (the last has a missing photo) run once by `python -m photomaker batch` in this process."""
    root = tmp_path_factory.mktemp("batch")
    shutil.copy(EXAMPLES / "astronaut.png", root / "me.png")
    jobs_file = write_jobs(
        root / "jobs.jsonl",
        [
            {**TINY_JOB, "id_images": ["me.png"], "seed": 1, "num_outputs": 2},
            {**TINY_JOB, "id_images": ["me.png"], "num_outputs": 1, "guidance_scale": 3.0},
            {**TINY_JOB, "id_images": ["nobody.png"], "seed": 2},
        ],
    )
    out = root / "out"
    # One thread, like each process of the 2-process run below: CPU float sums (hence, rarely, a pixel's
    # last bit) depend on how many threads split them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            status = main(
                ["batch", str(jobs_file), "--out", str(out), "--tiny", str(tiny_models_dir), "--face-backend", "none"]
            )
    finally:
        torch.set_num_threads(threads)
    return {"jobs": jobs_file, "out": out, "status": status, "tiny": tiny_models_dir}


def test_batch_writes_the_good_jobs_and_reports_the_bad_one(batch_case: dict, capsys: pytest.CaptureFixture) -> None:
    out = batch_case["out"]
    assert batch_case["status"] == 1
    assert sorted(path.name for path in out.glob("*.png")) == ["job-0001-0.png", "job-0001-1.png", "job-0002-0.png"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [error["line"] for error in errors] == [3]
    assert "nobody.png" in errors[0]["error"]
    params = read_parameters(out / "job-0001-1.png")
    assert (params["prompt"], params["seed"], params["num_steps"]) == ("a photo of a woman img", 2, 2)


def test_an_output_left_by_another_job_is_made_again(
    tmp_path: Path, photo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = {"id_images": ["photos/me.png"], "prompt": "a woman img", "seed": 10, "num_outputs": 1}
    out = tmp_path / "out"
    out.mkdir()
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [job])
    work, _ = batch.remaining_work(batch.parse_jobs(jobs_file), out)
    batch.run_work(work, out, fake_generate([]))
    # Unchanged (keys reordered): done. A new line inserted above: line 1 is another job now, made again.
    write_jobs(jobs_file, [dict(reversed(list(job.items())))])
    assert batch.remaining_work(batch.parse_jobs(jobs_file), out) == ([], ["job-0001-0.png"])
    write_jobs(jobs_file, [{**job, "prompt": "a man img"}, job])
    with caplog.at_level("WARNING", logger="photomaker.batch"):
        work, done = batch.remaining_work(batch.parse_jobs(jobs_file), out)
    assert done == [] and [(item.job.line, item.missing) for item in work] == [(1, [0]), (2, [0])]
    assert "job-0001-0.png was not made by line 1 as it is now" in caplog.text


def test_rerun_skips_finished_outputs_without_loading_the_model(
    batch_case: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import photomaker.service

    out = batch_case["out"]
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished batch must not load or run the model")

    monkeypatch.setattr(photomaker.service.PhotoMakerService, "wait_ready", no_model)
    monkeypatch.setattr(photomaker.service.PhotoMakerService, "generate", no_model)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    status = main(
        [
            "batch",
            str(batch_case["jobs"]),
            "--out",
            str(out),
            "--tiny",
            str(batch_case["tiny"]),
            "--face-backend",
            "none",
        ]
    )

    assert status == 1  # the bad job is still bad
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == before
    assert "0 images written, 3 already done; 1 of 3 jobs failed" in capsys.readouterr().err


def test_two_accelerate_processes_write_the_same_pixels_once_each(batch_case: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = out / "job-0001-1.png"  # a run killed after one output: that output must not be redone
    out.mkdir()
    shutil.copy(batch_case["out"] / partial.name, partial)
    # Without a GPU, `--multi_gpu` is what makes accelerate start N processes (`--cpu` starts one); the CLI
    # then joins them in a CPU (gloo) process group.
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "photomaker",
        "--verbose",
        "batch",
        str(batch_case["jobs"]),
        "--out",
        str(out),
        "--tiny",
        str(batch_case["tiny"]),
        "--face-backend",
        "none",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(launch, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    assert "2 images written, 1 already done; 1 of 3 jobs failed" in run.stderr, run.stderr[-3000:]
    # Job 1 went to process 0, job 2 to process 1 (job 3 is the bad one): both generated.
    assert "process 0/2: 2 unfinished jobs, 1 images" in run.stderr
    assert "process 1/2: 1 unfinished jobs, 1 images" in run.stderr
    written = [Path(line).name for line in run.stdout.splitlines() if line.endswith(".png")]
    assert sorted(written) == ["job-0001-0.png", "job-0002-0.png"]  # each once, across both processes
    single = batch_case["out"]
    assert sorted(path.name for path in out.glob("*.png")) == sorted(path.name for path in single.glob("*.png"))
    for path in out.glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(single / path.name))), path.name


def test_control_start_photo_and_style_images_resolve_relative_to_the_jobs_file(tmp_path: Path, photo: Path) -> None:
    shutil.copy(EXAMPLES / "grace_hopper.jpg", photo.parent / "pose.jpg")
    jobs_file = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {
                "id_images": ["photos/me.png"],
                "prompt": "a woman img",
                "control_type": "pose",
                "control_image": "photos/pose.jpg",
                "control_scale": 0.8,
                "control_end": 0.5,
                "style_image": "photos/me.png",
                "style_image_scale": 0.3,
            },
            {
                "id_images": ["photos/me.png"],
                "prompt": "a woman img",
                "init_image": "photos/pose.jpg",
                "strength": 0.5,
                "mask_face": True,
            },
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "init_image": "photos/gone.jpg"},
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "mask_image": ["photos/pose.jpg"]},
            {"id_images": ["photos/me.png"], "prompt": "a woman img", "mask_face": "yes"},
        ],
    )
    jobs = batch.parse_jobs(jobs_file)

    control = jobs[0].request
    assert (control.control_type, control.control_image) == ("pose", str(photo.parent / "pose.jpg"))
    assert (control.control_scale, control.control_end, control.control_start) == (0.8, 0.5, 0.0)
    assert (control.style_image, control.style_image_scale) == (str(photo), 0.3)
    start = jobs[1].request
    assert (start.init_image, start.strength, start.mask_face, start.mask_image) == (
        str(photo.parent / "pose.jpg"),
        0.5,
        True,
        None,
    )
    assert "image 'photos/gone.jpg' in 'init_image' not found" in jobs[2].error
    assert "'mask_image' must be an image path or null" in jobs[3].error
    assert "'mask_face' must be bool" in jobs[4].error


def test_a_batch_job_runs_a_control_mode_on_the_tiny_models(tiny_models_dir: Path, tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "astronaut.png", tmp_path / "me.png")
    shutil.copy(EXAMPLES / "grace_hopper.jpg", tmp_path / "edges.jpg")
    jobs_file = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {
                **TINY_JOB,
                "id_images": ["me.png"],
                "num_outputs": 1,
                "seed": 4,
                "control_type": "canny",
                "control_image": "edges.jpg",
            },
            {**TINY_JOB, "id_images": ["me.png"], "num_outputs": 1, "seed": 4, "control_type": "canny"},
        ],
    )
    status = main(
        [
            "batch",
            str(jobs_file),
            "--out",
            str(tmp_path / "out"),
            "--tiny",
            str(tiny_models_dir),
            "--face-backend",
            "none",
        ]
    )
    assert status == 1
    params = read_parameters(tmp_path / "out" / "job-0001-0.png")
    assert (params["control_type"], params["control_image"], params["control_scale"]) == ("canny", "edges.jpg", 1.0)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [error["line"] for error in errors] == [2] and "needs a control image" in errors[0]["error"]
