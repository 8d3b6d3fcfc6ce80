"""Batch generation from a JSON Lines file: job parsing, output naming, resume, and sharding across processes.

Design rules, each for a reason users notice:

- An output's file name depends only on its job: ``job-<line>-<k>.png`` (line number in the JSONL file, as an
  editor shows it, and output index k from 0). So a re-run, or a run on another number of processes, writes the
  same files, and a finished file can be recognised and skipped (resume). Each PNG records a hash of its job's
  line, so a file made by a different job (the jobs file was edited) is made again, never kept by mistake.
- Output k of a job is generated on its own with seed ``seed + k`` (with best-of-B: the best of the candidates
  ``seed + k*B ... seed + k*B + B-1``, so outputs never share a candidate); its pixels therefore depend neither
  on how outputs are grouped nor on which process runs them. A job without ``seed`` gets one derived from its
  content, never a random one, so a batch can always be reproduced.
- Files are written under a temporary name and renamed into place, so a killed run never leaves a half-written
  PNG under a final name (which would then be skipped as done).
- A bad job (invalid JSON, unknown field, missing photo, a prompt the service refuses) is reported and the
  others still run.
- Under ``accelerate launch`` every process parses the same file and lists the finished outputs *before* any
  process writes (a barrier separates the two), so all processes agree on the remaining work and split it
  round-robin without talking to each other; reports are gathered to the main process at the end.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from photomaker.errors import InvalidRequestError, ModelLoadError, PhotoMakerError
from photomaker.fields import FIELDS, REQUEST_FIELDS
from photomaker.presets import SEED_MAX
from photomaker.requests import GenerationRequest

if TYPE_CHECKING:
    from accelerate import PartialState

    from photomaker.requests import GenerationResult

logger = logging.getLogger(__name__)

ERRORS_FILE = "errors.jsonl"
# Long enough that processes that finish early can wait for a slow one at the final barrier.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)


def output_name(line: int, index: int) -> str:
    """File name of output `index` of the job on `line`: the same whichever process writes it."""
    return f"job-{line:04d}-{index}.png"


FINGERPRINT_KEY = "batch_job"  # PNG parameter holding the job's fingerprint


def output_seed(seed: int, index: int, best_of: int = 1) -> int:
    """Seed of output `index`: seed + index (times best_of, so candidate sets stay disjoint), wrapping like
    the service so that it stays a valid seed."""
    return (seed + index * best_of) % (SEED_MAX + 1)


@dataclass
class Job:
    """One line of the jobs file: a request ready for the service, or the reason it cannot run."""

    line: int
    request: GenerationRequest | None = None
    error: str | None = None
    # Hash of the line's content, written into each output's PNG: a file left by another job (the jobs file
    # was edited, a line inserted above) is not mistaken for this job's output on resume.
    fingerprint: str = ""

    @property
    def output_names(self) -> list[str]:
        """The job's output file names; none for a job that could not be parsed."""
        if self.request is None:
            return []
        return [output_name(self.line, index) for index in range(self.request.num_outputs)]


def _content_hash(fields: Any) -> bytes:
    """SHA-256 of a job's JSON content; key order and whitespace do not matter."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def derive_seed(fields: dict[str, Any]) -> int:
    """A seed from the job's content: reproducible, never random."""
    return int.from_bytes(_content_hash(fields)[:8], "big") % (SEED_MAX + 1)


def _resolve_paths(value: Any, name: str, base_dir: Path) -> list[str]:
    """The photo paths of field `name` as absolute strings; each must be an existing file."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequestError(f"'{name}' must be a list of image paths.")
    paths = []
    for item in value:
        path = base_dir / Path(item).expanduser()
        if not path.is_file():
            raise InvalidRequestError(f"photo {item!r} in '{name}' not found (looked for {path}).")
        paths.append(str(path))
    return paths


def _resolve_image_path(value: Any, name: str, base_dir: Path) -> str:
    """The path of an existing image (relative to `base_dir`)."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be an image path or null, got {json.dumps(value)}.")
    path = base_dir / Path(value).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"image {value!r} in '{name}' not found (looked for {path}).")
    return str(path)


def parse_job(fields: Any, base_dir: Path) -> GenerationRequest:
    """A `GenerationRequest` from one decoded JSON line (keys and types from the field table); raises
    `InvalidRequestError` saying what is wrong. Photo paths are relative to `base_dir`."""
    if not isinstance(fields, dict):
        raise InvalidRequestError(f"a job must be a JSON object, got {type(fields).__name__}.")
    known = list(FIELDS)
    for key in fields:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known fields: {', '.join(known)}."
            raise InvalidRequestError(f"unknown field '{key}'.{hint}")
    for item in REQUEST_FIELDS:
        if item.required and item.name not in fields:
            raise InvalidRequestError(f"missing field '{item.name}'.")
    values = dict(fields)
    for key, value in fields.items():
        item = FIELDS[key]
        if item.kind == "images":
            values[key] = _resolve_paths(value, key, base_dir)
            continue
        if item.kind == "image" and value is not None:
            values[key] = _resolve_image_path(value, key, base_dir)
            continue
        kinds = item.json_types()
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
            raise InvalidRequestError(f"'{key}' must be {expected}, got {json.dumps(value)}.")
    num_outputs = values.setdefault("num_outputs", FIELDS["num_outputs"].default)
    low, high = FIELDS["num_outputs"].bounds()
    if not low <= num_outputs <= high:
        raise InvalidRequestError(f"'num_outputs' must be between {low:g} and {high:g}, got {num_outputs}.")
    if values.get("seed") is None:
        values["seed"] = derive_seed({key: value for key, value in fields.items() if key != "seed"})
    elif not 0 <= values["seed"] <= SEED_MAX:
        raise InvalidRequestError(f"'seed' must be between 0 and {SEED_MAX}, got {values['seed']}.")
    return GenerationRequest(**values)


def parse_jobs(jobs_file: str | os.PathLike[str]) -> list[Job]:
    """Every non-blank line of `jobs_file` as a `Job`; a line that cannot be used becomes a Job with an error."""
    path = Path(jobs_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"jobs file {str(path)!r} not found.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"cannot read jobs file {str(path)!r}: {error}") from None
    base_dir = path.resolve().parent
    jobs = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            jobs.append(Job(line_number, error=f"invalid JSON: {error.msg} (column {error.colno})"))
            continue
        try:
            jobs.append(Job(line_number, request=parse_job(fields, base_dir), fingerprint=_content_hash(fields).hex()))
        except PhotoMakerError as error:
            jobs.append(Job(line_number, error=str(error)))
    if not jobs:
        raise InvalidRequestError(f"jobs file {str(path)!r} has no jobs (one JSON object per line).")
    return jobs


@dataclass
class WorkItem:
    """The part of one job a process still has to do: the outputs not yet on disk, or the job's error."""

    job: Job
    missing: list[int]


def make_output_dir(path: Path) -> None:
    """Create the output folder (and its parents); say so plainly when that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidRequestError(f"cannot create the output folder {str(path)!r}: {error.strerror}.") from None


def remaining_work(jobs: Sequence[Job], out_dir: Path) -> tuple[list[WorkItem], list[str]]:
    """(work to do, names of outputs already present). Must be computed before any process writes."""
    work, done = [], []
    for job in jobs:
        missing = []
        for index, name in enumerate(job.output_names):
            if _made_by(out_dir / name, job):
                done.append(name)
            else:
                missing.append(index)
        if job.error is not None or missing:
            work.append(WorkItem(job, missing))
    return work, done


def _made_by(path: Path, job: Job) -> bool:
    """Whether `path` holds an output of `job` (not of another job that had its line before)."""
    from photomaker.metadata import read_parameters

    if not path.is_file():
        return False
    try:
        made_by = read_parameters(path).get(FINGERPRINT_KEY)
    except Exception:  # noqa: BLE001 - unreadable or foreign: make it again
        made_by = None
    if made_by != job.fingerprint:
        logger.warning("%s was not made by line %d as it is now; making it again", path.name, job.line)
        return False
    return True


def shard(items: Sequence[Any], process_index: int, num_processes: int) -> list[Any]:
    """This process's share, round-robin: disjoint across processes, together exactly `items`."""
    return list(items[process_index::num_processes])


@dataclass
class BatchReport:
    """What one process (or, once merged, the whole batch) did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"line", "error", "type"}
    fatal: list[str] = field(default_factory=list)  # a process could not load the model
    num_jobs: int = 0  # jobs in the file (set on the merged report)

    @classmethod
    def merge(cls, reports: Sequence[BatchReport]) -> BatchReport:
        merged = cls()
        for report in reports:
            merged.written += report.written
            merged.skipped += report.skipped
            merged.failures += report.failures
            merged.fatal += report.fatal
        merged.written.sort()
        merged.skipped.sort()
        merged.failures.sort(key=lambda failure: failure["line"])
        return merged


def save_atomically(image: Any, parameters: dict[str, Any], target: Path) -> None:
    """Write the PNG under a hidden temporary name, flush it to disk, then rename it onto `target`."""
    from photomaker.metadata import save_png

    partial = target.with_name(f".partial-{target.name}")
    try:
        save_png(image, partial, parameters)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


Generate = Callable[["GenerationRequest"], "GenerationResult"]


def run_work(
    work: Sequence[WorkItem],
    out_dir: Path,
    generate: Generate,
    on_output: Callable[[Path], None] = lambda path: None,
) -> BatchReport:
    """Generate and save every missing output of `work`; a failing job is recorded and the next one runs.

    Output k is requested alone with `output_seed` (see the module docstring). The first failure of a job
    ends that job: its remaining outputs would fail the same way.
    """
    report = BatchReport()
    for item in work:
        job = item.job
        if job.error is not None:
            _record_failure(report, job.line, job.error, "InvalidRequestError")
            continue
        assert job.request is not None
        for index in item.missing:
            seed = output_seed(job.request.seed, index, job.request.best_of)
            request = dataclasses.replace(job.request, seed=seed, num_outputs=1)
            target = out_dir / output_name(job.line, index)
            try:
                result = generate(request)
                generated = result.images[0]
                save_atomically(generated.image, {**generated.parameters, FINGERPRINT_KEY: job.fingerprint}, target)
            except PhotoMakerError as error:
                _record_failure(report, job.line, str(error), type(error).__name__)
                break
            except Exception as error:  # one broken job must not stop the batch
                logger.exception("job on line %d failed unexpectedly", job.line)
                _record_failure(report, job.line, f"{type(error).__name__}: {error}", type(error).__name__)
                break
            report.written.append(target.name)
            on_output(target)
    return report


def _record_failure(report: BatchReport, line: int, message: str, kind: str) -> None:
    print(f"job on line {line}: error: {message}", file=sys.stderr, flush=True)
    report.failures.append({"line": line, "error": message, "type": kind})


def process_state(cpu: bool = False) -> PartialState:
    """accelerate's view of this process (index, count, device); a plain single process without a launcher.

    Without a GPU, a multi-process launch (``accelerate launch --multi_gpu`` or ``torchrun``) only becomes a
    process group when accelerate is told to use the CPU, so that is inferred here.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not torch.cuda.is_available())
    return PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


def process_device(state: PartialState) -> str | None:
    """The device this process should load the model on; None (automatic) for a single process."""
    if state.num_processes == 1:
        return None
    return "cpu" if state.device.type == "cpu" else str(state.device)


def summary_line(report: BatchReport, errors_path: Path) -> str:
    """One line that says what the whole batch did."""
    text = f"{len(report.written)} images written, {len(report.skipped)} already done"
    failed_jobs = len({failure["line"] for failure in report.failures})
    if failed_jobs:
        text += f"; {failed_jobs} of {report.num_jobs} jobs failed (see {errors_path})"
    else:
        text += f"; all {report.num_jobs} jobs done"
    return f"batch: {text}"


def run_batch(
    jobs_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    state: PartialState,
    make_generate: Callable[[], Generate],
) -> BatchReport:
    """Run this process's share of the batch; return the merged report of all processes (on every process).

    `make_generate` loads the model and returns the generate function; it is called once, and only when this
    process has images to make. A loading failure in any process is raised in every process (as
    `ModelLoadError`) after the others have finished their share, rather than leaving them waiting for it.
    The main process writes ``errors.jsonl`` (or removes a stale one).
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    out = Path(out_dir)
    jobs = parse_jobs(jobs_file)
    make_output_dir(out)  # in every process, so that a failure stops them all rather than one
    work, done = remaining_work(jobs, out)
    # Nobody writes before everyone has listed what is done: all processes then agree on `work`.
    state.wait_for_everyone()
    mine = shard(work, state.process_index, state.num_processes)
    total = sum(len(item.missing) for item in mine)
    logger.info(
        "process %d/%d: %d unfinished jobs, %d images", state.process_index, state.num_processes, len(mine), total
    )

    report = BatchReport()
    try:
        generate = make_generate() if total else _no_images_to_generate
    except PhotoMakerError as error:
        report.fatal.append(str(error))
    except Exception as error:  # reported to every process below instead of leaving them waiting
        logger.exception("process %d could not load the model", state.process_index)
        report.fatal.append(f"{type(error).__name__}: {error}")
    else:
        with tqdm(total=total, unit="image", file=sys.stderr, desc="batch", disable=not state.is_main_process) as bar:

            def on_output(path: Path) -> None:
                print(path, flush=True)
                bar.update(1)

            report = run_work(mine, out, generate, on_output)
    if state.is_main_process:
        report.skipped = done

    merged = BatchReport.merge(gather_object([report]))
    merged.num_jobs = len(jobs)
    if merged.fatal:
        raise ModelLoadError(merged.fatal[0])
    if state.is_main_process:
        errors_path = out / ERRORS_FILE
        if merged.failures:
            errors_path.write_text("".join(json.dumps(failure) + "\n" for failure in merged.failures))
        else:
            errors_path.unlink(missing_ok=True)
    state.wait_for_everyone()
    return merged


def _no_images_to_generate(request: GenerationRequest) -> GenerationResult:
    """Stands in for the model in a process whose share holds only jobs that failed to parse."""
    raise AssertionError("this process has no images to generate")
