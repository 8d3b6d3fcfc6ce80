"""The package's layout holds: old imports keep working, the layers import only downwards, and the library
does not depend on the repository's top-level files."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "photomaker"

# Every public name `photomaker.service` offered before it was split (user code imports them from there).
SERVICE_NAMES_BEFORE_THE_SPLIT = (
    "DEFAULT_ADAPTER_FILE",
    "DEFAULT_ADAPTER_REPO",
    "DEFAULT_BASE_MODEL",
    "ENV_VARIABLES",
    "MAX_BATCH",
    "MAX_PROMPT_CHARS",
    "SINGLE_FILE_SUFFIXES",
    "GeneratedImage",
    "GenerationPlan",
    "GenerationRequest",
    "GenerationResult",
    "PhotoMakerService",
    "ProgressCallback",
    "ServiceConfig",
    "ServiceStatus",
    "default_fused_cache_dir",
    "explain_load_error",
    "parse_switch",
    "resolve_device_and_dtype",
)
PIPELINE_LAYER = (
    "photomaker.pipeline",
    "photomaker.pipeline_mixin",
    "photomaker.pipeline_controlnet",
    "photomaker.pipeline_t2i_adapter",
    "photomaker.pipeline_img2img",
    "photomaker.pipeline_inpaint",
    "photomaker.id_encoder",
    "photomaker.loading",
)
SERVICE_LAYER = (
    "photomaker.service",
    "photomaker.config",
    "photomaker.requests",
    "photomaker.validation",
    "photomaker.lifecycle",
    "photomaker.generation",
    "photomaker.fields",
    "photomaker.metadata",
    "photomaker.batch",
    "photomaker.cli",
)


def module_path(module: str) -> Path | None:
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _absolute(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute name of what `node` imports from: `from .faces import x` inside photomaker.pipeline_mixin
    is photomaker.faces (a relative import must not slip past the layering rules)."""
    if node.level == 0:
        return node.module
    is_package = module_path(module).name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base) or None


def imported_modules(module: str) -> set[str]:
    """Modules that `module` imports anywhere in its source (module level or inside functions)."""
    path = module_path(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if source is None:
                continue
            found.add(source)
            # `from photomaker import faces` imports the module photomaker.faces
            found.update(
                f"{source}.{alias.name}" for alias in node.names if module_path(f"{source}.{alias.name}") is not None
            )
    return found


def reachable(module: str) -> set[str]:
    """Every photomaker module that importing `module` (and calling its functions) can load."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen or module_path(current) is None:
            continue
        seen.add(current)
        todo.extend(name for name in imported_modules(current) if name.startswith("photomaker."))
    return seen - {module}


@pytest.mark.parametrize("name", SERVICE_NAMES_BEFORE_THE_SPLIT)
def test_every_old_service_import_still_works(name: str) -> None:
    service = importlib.import_module("photomaker.service")
    assert getattr(service, name) is not None
    assert name in service.__all__


@pytest.mark.parametrize("module", PIPELINE_LAYER)
def test_the_pipeline_layer_imports_neither_faces_nor_the_service(module: str) -> None:
    forbidden = sorted(
        name for name in reachable(module) if name.startswith("photomaker.faces") or name in SERVICE_LAYER
    )
    assert forbidden == [], f"{module} reaches {forbidden}"


def test_metadata_does_not_import_the_service() -> None:
    assert not {"photomaker.service", "photomaker.generation", "photomaker.lifecycle"} & reachable(
        "photomaker.metadata"
    )


def test_validation_needs_no_model_code() -> None:
    assert not {"photomaker.pipeline", "photomaker.lifecycle", "photomaker.generation"} & reachable(
        "photomaker.validation"
    )


def test_the_package_never_imports_the_top_level_template_modules() -> None:
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if {"style_template", "aspect_ratio_template"}
        & imported_modules(
            "photomaker." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        )
    ]
    assert offenders == []


def test_the_top_level_template_modules_are_the_package_tables() -> None:
    import aspect_ratio_template
    import style_template
    from photomaker import aspect_ratios, styles

    assert style_template.STYLES is styles.STYLES and style_template.apply_style is styles.apply_style
    assert aspect_ratio_template.ASPECT_RATIOS is aspect_ratios.ASPECT_RATIOS
    assert aspect_ratio_template.get_size is aspect_ratios.get_size


def _package_modules() -> list[str]:
    """Every module of the package, by its dotted name."""
    return sorted(
        "photomaker." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
    )


def test_only_app_support_imports_gradio() -> None:
    """Gradio is the `app` extra: the library, the CLI and batch must import without it."""
    importers = [
        module
        for module in _package_modules()
        if any(name == "gradio" or name.startswith("gradio.") for name in imported_modules(module))
    ]
    assert importers == ["photomaker.app_support"]
