"""Low-VRAM mode, measured: what model CPU offload keeps on the accelerator, and a check that it does so.

* `component_sizes(pipe_or_modules, dtype)`: bytes of each weight-holding part (ID encoder included) in a dtype.
* `offload_residency(sizes)`: with `enable_model_cpu_offload` one component sits on the accelerator at a time,
  so the largest resident set of weights is the largest component; without offload it is all of them.
* `OffloadTracer(pipe)`: instruments the offload hooks of a pipeline (any device, the CPU included) and records
  which components are resident at every moment, and whether any module ran while its component was offloaded
  (on a GPU that would mean it ran on the CPU). Use it to verify offload without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["OffloadTracer", "Residency", "component_modules", "component_sizes", "offload_residency"]

# The order in which one generation uses the parts (the ID encoder first, as in PhotoMaker's __call__).
COMPONENT_ORDER = ("id_encoder", "text_encoder", "text_encoder_2", "image_encoder", "unet", "vae")


def component_modules(pipe: Any) -> dict[str, nn.Module]:
    """The weight-holding parts of a (PhotoMaker) SDXL pipeline by name, the ID encoder included."""
    modules = {name: value for name, value in pipe.components.items() if isinstance(value, nn.Module)}
    if getattr(pipe, "id_encoder", None) is not None:
        modules["id_encoder"] = pipe.id_encoder
    order = {name: i for i, name in enumerate(COMPONENT_ORDER)}
    return dict(sorted(modules.items(), key=lambda item: order.get(item[0], len(order))))


def _bytes(module: nn.Module, dtype: torch.dtype | None) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        element = (
            torch.empty((), dtype=dtype).element_size()
            if dtype is not None and tensor.is_floating_point()
            else tensor.element_size()
        )
        total += tensor.numel() * element
    return total


def component_sizes(pipe_or_modules: Any, dtype: torch.dtype | None = torch.float16) -> dict[str, int]:
    """Bytes of each component's parameters and buffers, as if stored in ``dtype`` (None: as they are).

    Works on ``meta`` modules too, so real SDXL sizes can be computed without any memory.
    """
    modules = pipe_or_modules if isinstance(pipe_or_modules, Mapping) else component_modules(pipe_or_modules)
    return {name: _bytes(module, dtype) for name, module in modules.items()}


@dataclass
class Residency:
    """Largest set of weights on the accelerator at any stage."""

    stages: list[tuple[str, int]]  # (stage = resident component(s), bytes)
    peak_stage: str
    peak_bytes: int
    all_resident_bytes: int  # without offload: everything at once


def offload_residency(sizes: Mapping[str, int]) -> Residency:
    """Model CPU offload: each stage holds exactly one component on the accelerator."""
    stages = [(name, size) for name, size in sizes.items()]
    peak_stage, peak_bytes = max(stages, key=lambda item: item[1])
    return Residency(stages, peak_stage, peak_bytes, sum(sizes.values()))


# ------------------------------------------------------------------------------------------- hook tracing


@dataclass
class OffloadEvent:
    kind: str  # "onload" | "offload" | "ran-offloaded"
    component: str
    resident: tuple[str, ...]  # resident components after the event
    detail: str = ""


@dataclass
class OffloadTrace:
    events: list[OffloadEvent] = field(default_factory=list)
    hooked: dict[str, bool] = field(default_factory=dict)  # component -> has a model-offload hook
    max_resident: tuple[str, ...] = ()
    ran_offloaded: list[str] = field(default_factory=list)  # "component.child" that ran while offloaded
    onloaded: list[str] = field(default_factory=list)  # components brought to the device, in order

    def peak(self, sizes: Mapping[str, int]) -> tuple[tuple[str, ...], int]:
        """The resident set with the most bytes at any moment, and its bytes."""
        best: tuple[tuple[str, ...], int] = ((), 0)
        for event in self.events:
            total = sum(sizes.get(name, 0) for name in event.resident)
            if total > best[1]:
                best = (event.resident, total)
        return best

    def alone(self, component: str) -> bool:
        """Whether ``component`` was the only resident one every time it was resident."""
        return all(event.resident == (component,) for event in self.events if component in event.resident)


class OffloadTracer:
    """Records what `enable_model_cpu_offload` keeps resident, from its accelerate hooks.

    Call after `pipe.enable_model_cpu_offload(...)`; use as a context manager around pipeline calls. Residency
    is logical (a hook's ``pre_forward`` brings its model in, ``offload`` / ``init_hook`` sends it back), so it
    is exact on the CPU as on a GPU. A forward pre-hook on each component and its direct children flags any
    module that runs while its component is offloaded.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.modules = component_modules(pipe)
        self.trace = OffloadTrace()
        self._resident: set[str] = set()
        self._undo: list[Any] = []

    def _name_of(self, model: nn.Module) -> str | None:
        return next((name for name, module in self.modules.items() if module is model), None)

    def _record(self, kind: str, component: str, detail: str = "") -> None:
        resident = tuple(sorted(self._resident, key=lambda n: list(self.modules).index(n)))
        self.trace.events.append(OffloadEvent(kind, component, resident, detail))
        if len(resident) > len(self.trace.max_resident):
            self.trace.max_resident = resident

    def install(self) -> None:
        hooks = list(getattr(self.pipe, "_all_hooks", []) or [])
        hooked: set[str] = set()
        for user_hook in hooks:
            name = self._name_of(getattr(user_hook, "model", None))
            inner = getattr(user_hook, "hook", None)
            if name is None or inner is None:
                continue
            hooked.add(name)
            self._wrap(inner, "pre_forward", name, onload=True)
            self._wrap(inner, "init_hook", name, onload=False)
        self.trace.hooked = {name: name in hooked for name in self.modules}
        for name, module in self.modules.items():
            # Children only: the component's own forward pre-hooks run before accelerate's pre_forward.
            for child_name, child in module.named_children():
                handle = child.register_forward_pre_hook(self._make_check(name, child_name))
                self._undo.append(handle.remove)

    def _wrap(self, hook: Any, method: str, name: str, onload: bool) -> None:
        original = getattr(hook, method)

        def wrapped(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if onload:
                # pre_forward first sends the previous model of the chain back. accelerate skips that when the
                # previous model already sits on the CPU, which on a CPU-only machine is always: record it here
                # so that the trace shows what happens on an accelerator.
                previous = getattr(hook, "prev_module_hook", None)
                previous_name = self._name_of(getattr(previous, "model", None)) if previous is not None else None
                if previous_name in self._resident:
                    self._resident.discard(previous_name)
                    self._record("offload", previous_name, "previous in the chain")
            result = original(module, *args, **kwargs)
            if onload:
                if name not in self._resident:
                    self._resident.add(name)
                    self.trace.onloaded.append(name)
                    self._record("onload", name)
            elif name in self._resident:
                self._resident.discard(name)
                self._record("offload", name)
            return result

        setattr(hook, method, wrapped)  # an instance attribute shadowing the class's method
        self._undo.append(lambda: vars(hook).pop(method, None))

    def _make_check(self, component: str, child: str):
        def check(module: nn.Module, args: Any) -> None:
            if component not in self._resident:
                where = f"{component}.{child}"
                if where not in self.trace.ran_offloaded:
                    self.trace.ran_offloaded.append(where)
                self._record("ran-offloaded", component, child)

        return check

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    @contextmanager
    def tracing(self) -> Iterator[OffloadTrace]:
        self.install()
        try:
            yield self.trace
        finally:
            self.remove()
