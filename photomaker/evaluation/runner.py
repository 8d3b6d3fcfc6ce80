"""The evaluation run: plan every image, generate the missing ones, score them, merge the rows.

Resume and multi-process rules follow `photomaker.batch`: an image's path depends only on its work item
(``images/<setting>/<identity>/<prompt>-<k>.png``), its PNG records a fingerprint of everything that made it,
and a file whose fingerprint matches is neither made nor (when results.jsonl already holds its row, scored by
the same models against the same references, in the same group) scored again. Under ``accelerate launch`` every
process lists what is done before anyone writes, then makes every N-th missing image and scores every N-th group
(one identity under one setting, so that Face Div sees all of that identity's faces); the main process gathers
the rows and writes the results.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from photomaker.batch import make_output_dir, save_atomically, shard
from photomaker.errors import EvaluationError, IDImageError, InvalidRequestError
from photomaker.evaluation.inputs import Identity, fill_class
from photomaker.evaluation.metrics import References, Scorers, score_images
from photomaker.evaluation.settings import Setting, image_seed, setting_folder

if TYPE_CHECKING:
    from accelerate import PartialState

    from photomaker.service import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
IMAGES_DIR = "images"
FINGERPRINT_KEY = "eval_item"  # PNG parameter: the work item's fingerprint
SECONDS_KEY = "eval_seconds"  # PNG parameter: how long the image took to make

Generate = Callable[["GenerationRequest"], "GenerationResult"]


@dataclass
class EvalPlan:
    """What to generate: identities x prompts x images per prompt, under every setting."""

    identities: list[Identity]
    prompts: list[str]
    settings: list[Setting]
    images_per_prompt: int = 4
    num_references: int = 4
    base_seed: int = 0
    request: dict[str, Any] = field(default_factory=dict)  # generation fields shared by every setting
    model: dict[str, Any] = field(default_factory=dict)  # the resolved model settings, part of every fingerprint


@dataclass(frozen=True)
class WorkItem:
    """One image to have: where it goes, how it is made, and the fingerprint that recognises it."""

    setting: Setting
    identity: Identity
    prompt_index: int
    image_index: int
    prompt: str  # with the class word filled in
    seed: int
    references: tuple[Path, ...]  # the photos the generator sees
    path: Path
    fingerprint: str

    @property
    def group(self) -> tuple[str, str]:
        """Face Div's group: every image of one identity under one setting."""
        return self.setting.label, self.identity.name


def _fingerprint(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _local_contents(value: Any) -> Any:
    """A model setting as a fingerprint sees it: a local file or folder also by its size and modification time,
    so that a checkpoint trained further at the same path makes its images again instead of reusing the old."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [item for item in path.rglob("*") if item.is_file()]
    else:
        return value
    stats = [item.stat() for item in files]
    return [value, sum(stat.st_size for stat in stats), max((stat.st_mtime_ns for stat in stats), default=0)]


def plan_items(plan: EvalPlan, out_dir: Path) -> list[WorkItem]:
    """Every image of the run, setting by setting, in a fixed order."""
    folders: dict[str, str] = {}
    items = []
    for setting in plan.settings:
        folder = setting_folder(setting.label)
        if folders.setdefault(folder, setting.label) != setting.label:
            raise InvalidRequestError(
                f"settings {folders[folder]!r} and {setting.label!r} would share the folder "
                f"{folder!r}; give the values different names."
            )
        num_references = setting.num_references or plan.num_references
        if num_references < 1:
            raise InvalidRequestError(f"setting {setting.label!r}: num_references must be at least 1.")
        for identity in plan.identities:
            if len(identity.photos) < num_references:
                raise IDImageError(
                    f"identity {identity.name!r} has {len(identity.photos)} photos but "
                    f"{num_references} references are asked; add photos or lower --num-references."
                )
            references = identity.photos[:num_references]
            for prompt_index, template in enumerate(plan.prompts):
                prompt = fill_class(template, identity.class_word)
                for image_index in range(plan.images_per_prompt):
                    seed = image_seed(plan.base_seed, identity.name, prompt_index, image_index)
                    request = {**plan.request, **setting.request}
                    fingerprint = _fingerprint(
                        {
                            "prompt": prompt,
                            "seed": seed,
                            "request": request,
                            "model": {k: _local_contents(v) for k, v in {**plan.model, **setting.service}.items()},
                            "references": [path.name for path in references],
                            "identity": identity.name,
                        }
                    )
                    path = out_dir / IMAGES_DIR / folder / identity.name / f"{prompt_index:02d}-{image_index}.png"
                    items.append(
                        WorkItem(
                            setting, identity, prompt_index, image_index, prompt, seed, references, path, fingerprint
                        )
                    )
    return items


def recorded_parameters(item: WorkItem) -> dict[str, Any] | None:
    """The PNG parameters of `item`'s file when that file was made by this very item, else None."""
    from photomaker.metadata import read_parameters

    if not item.path.is_file():
        return None
    try:
        parameters = read_parameters(item.path)
    except Exception:  # noqa: BLE001 - unreadable or foreign: make it again
        return None
    if parameters.get(FINGERPRINT_KEY) != item.fingerprint:
        logger.warning("%s was made with other settings; making it again", item.path)
        return None
    return parameters


def _by_group(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    groups: dict[tuple[str, str], list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    return list(groups.values())


def generation_request(item: WorkItem, plan: EvalPlan) -> GenerationRequest:
    """The one-image request for `item`."""
    from photomaker.service import GenerationRequest

    fields = {**plan.request, **item.setting.request}
    return GenerationRequest(
        id_images=[str(path) for path in item.references], prompt=item.prompt, seed=item.seed, num_outputs=1, **fields
    )


def generate_items(
    items: Sequence[WorkItem],
    plan: EvalPlan,
    make_generate: Callable[[Setting], Generate],
    on_image: Callable[[WorkItem], None] = lambda item: None,
) -> int:
    """Make each item's image (one model per setting, loaded when first needed); return how many were made."""
    made = 0
    current: tuple[Setting, Generate] | None = None
    for item in items:
        if current is None or current[0].service != item.setting.service:
            current = None  # release the previous setting's model before loading the next
            _free_accelerator_memory()
            current = (item.setting, make_generate(item.setting))
        started = time.perf_counter()
        result = current[1](generation_request(item, plan))
        seconds = time.perf_counter() - started
        generated = result.images[0]
        item.path.parent.mkdir(parents=True, exist_ok=True)
        parameters = {**generated.parameters, FINGERPRINT_KEY: item.fingerprint, SECONDS_KEY: round(seconds, 4)}
        save_atomically(generated.image, parameters, item.path)
        made += 1
        on_image(item)
    return made


def _free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _scoring_signature(scorer_spec: dict[str, Any], group: Sequence[WorkItem]) -> str:
    """What a group's rows depend on beyond its images: the scoring models, every reference photo of the
    identity (the metrics compare with all of them, not only the ones the generator saw) and the group's
    members (Face Div is one value over the whole group)."""
    return _fingerprint(
        {
            "scorers": scorer_spec,
            "references": [path.name for path in group[0].identity.photos],
            "group": [item.fingerprint for item in group],
        }
    )


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier results.jsonl by fingerprint (a missing or damaged file gives none)."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            rows[row["fingerprint"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def score_groups(
    groups: Sequence[Sequence[WorkItem]],
    out_dir: Path,
    scorer_spec: dict[str, Any],
    load_scorers: Callable[[], Scorers],
    remade: set[str] = frozenset(),
) -> list[dict[str, Any]]:
    """One row per image of `groups`; a group scored before by the same models against the same references and
    with the same members, none of whose images was made again in this run (fingerprints in `remade`), keeps
    its rows."""
    from photomaker.images import load_image
    from photomaker.metadata import read_parameters

    earlier = read_results(out_dir / RESULTS_FILE)
    scorers: Scorers | None = None
    references: dict[str, References] = {}
    rows: list[dict[str, Any]] = []
    for group in groups:
        signature = _scoring_signature(scorer_spec, group)
        kept = [earlier.get(item.fingerprint) for item in group]
        if all(
            row is not None and row.get("scorers") == signature and row["fingerprint"] not in remade for row in kept
        ):
            rows.extend(row for row in kept if row is not None)
            continue
        if scorers is None:
            scorers = load_scorers()
        identity = group[0].identity
        if identity.name not in references:
            references[identity.name] = scorers.references(identity.photos, [path.name for path in identity.photos])
        images = [load_image(item.path) for item in group]
        metrics = score_images(
            images,
            [item.prompt for item in group],
            references[identity.name],
            scorers,
            groups=[identity.name] * len(group),
        )
        for item, values in zip(group, metrics, strict=True):
            seconds = read_parameters(item.path).get(SECONDS_KEY)
            rows.append(
                {
                    "setting": item.setting.label,
                    "identity": item.identity.name,
                    "prompt_index": item.prompt_index,
                    "image_index": item.image_index,
                    "seed": item.seed,
                    "prompt": item.prompt,
                    "path": str(item.path.relative_to(out_dir)),
                    **values,
                    "seconds": seconds,
                    "fingerprint": item.fingerprint,
                    "scorers": signature,
                }
            )
    return rows


def run_evaluation(
    plan: EvalPlan,
    out_dir: str | Path,
    state: PartialState,
    make_generate: Callable[[Setting], Generate],
    load_scorers: Callable[[], Scorers],
    scorer_spec: dict[str, Any],
) -> tuple[list[dict[str, Any]], int]:
    """Generate and score this process's share; return (all rows in plan order, images made by all processes)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    out = Path(out_dir)
    make_output_dir(out)
    items = plan_items(plan, out)
    missing = [item for item in items if recorded_parameters(item) is None]
    state.wait_for_everyone()  # nobody writes before everyone has listed what is done
    mine = shard(missing, state.process_index, state.num_processes)
    logger.info(
        "process %d/%d: %d of %d images to make", state.process_index, state.num_processes, len(mine), len(items)
    )
    with tqdm(total=len(mine), unit="image", desc="eval", disable=not state.is_main_process) as bar:
        made = _together(state, lambda: generate_items(mine, plan, make_generate, lambda item: bar.update(1)))
    # Every image exists now (_together waited for every process).
    to_score = shard(_by_group(items), state.process_index, state.num_processes)
    remade = {item.fingerprint for item in missing}
    rows = _together(state, lambda: score_groups(to_score, out, scorer_spec, load_scorers, remade))
    gathered = gather_object([rows])
    made = sum(gather_object([made]))
    all_rows = sorted(
        (row for part in gathered for row in part),
        key=lambda row: (_order(plan, row["setting"]), row["identity"], row["prompt_index"], row["image_index"]),
    )
    if state.is_main_process:
        text = "".join(json.dumps(row) + "\n" for row in all_rows)
        partial = out / f".partial-{RESULTS_FILE}"
        partial.write_text(text, encoding="utf-8")
        partial.replace(out / RESULTS_FILE)
    state.wait_for_everyone()
    return all_rows, made


def _together(state: PartialState, step: Callable[[], Any]) -> Any:
    """Run `step` in every process; if it fails in any, raise in all (rather than leave the others waiting)."""
    from accelerate.utils import gather_object

    if state.num_processes == 1:
        return step()
    result, failure = None, None
    try:
        result = step()
    except Exception as error:  # reported to every process below
        logger.exception("process %d failed", state.process_index)
        failure = f"process {state.process_index}: {type(error).__name__}: {error}"
    failures = [message for message in gather_object([failure]) if message]
    if failures:
        raise EvaluationError(f"eval stopped: {failures[0]}")
    return result


def _order(plan: EvalPlan, label: str) -> int:
    return [setting.label for setting in plan.settings].index(label)


def rows_by_setting(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(setting, its rows) in the rows' order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["setting"], []).append(row)
    yield from grouped.items()
