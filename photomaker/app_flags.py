"""The web app's command line: the model flags shared with the CLI plus the server's (address, port, queue),
each over its environment variable, and the service configuration they make.

Pure argparse, no gradio: `app.py` calls it, tests call it without building a page.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from spaces.config import Config as SpacesConfig

from photomaker.config import ENV_VARIABLES, ServiceConfig, parse_switch
from photomaker.flags import MODEL_FLAGS, add_model_flags, model_settings


def _switch(text: str) -> bool:
    """An on/off setting, spelled as the service's PHOTOMAKER_* switches are."""
    try:
        return parse_switch(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _whole_number(low: int, high: int | None = None) -> Any:
    """A parser of whole numbers from `low` (to `high`), for a flag and its environment variable."""
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def whole_number(text: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"use a whole number {bounds}, not {text!r}")
        return number

    return whole_number


def parse_args(argv: Sequence[str] | None = None, *, tiny_default: str | None = None) -> argparse.Namespace:
    """Command-line flags. Model flags left out fall back to the PHOTOMAKER_* variables read by
    `ServiceConfig.from_env`; server flags read the variables named in their help. With `tiny_default`,
    `--tiny` alone uses that folder (app.py passes the one next to it)."""
    flagged = {item.setting for item in MODEL_FLAGS}
    env_only = [name for name, (setting, _) in ENV_VARIABLES.items() if setting not in flagged]
    parser = argparse.ArgumentParser(
        description="PhotoMaker web app (Gradio). Each flag can also be set with the environment variable "
        "in brackets; a flag given here wins.",
        epilog=f"Settings without a flag, set by environment variable only (README, Configuration): "
        f"{', '.join(env_only)}.",
    )

    def env(name: str, default: Any, parse: Any) -> Any:
        """The variable `name` parsed, or `default` when unset; a bad value stops with a message naming it."""
        text = os.environ.get(name, "")
        if not text:
            return default
        try:
            return parse(text)
        except argparse.ArgumentTypeError as error:
            parser.error(f"{name}={text!r} is not valid: {error}")

    add_model_flags(parser.add_argument_group("model"), tiny_default=tiny_default)
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface [GRADIO_SERVER_NAME, default %(default)s]",
    )
    port = _whole_number(1, 65535)
    server.add_argument(
        "--port",
        type=port,
        default=env("GRADIO_SERVER_PORT", 7860, port),
        help="port [GRADIO_SERVER_PORT, default %(default)s]",
    )
    server.add_argument(
        "--share",
        action="store_true",
        default=env("PHOTOMAKER_SHARE", False, _switch),
        help="also create a public gradio.live link [PHOTOMAKER_SHARE=1]",
    )
    positive = _whole_number(1)
    server.add_argument(
        "--max-queue",
        type=positive,
        default=env("PHOTOMAKER_MAX_QUEUE", 20, positive),
        help="requests allowed to wait; more are told the queue is full [PHOTOMAKER_MAX_QUEUE, default %(default)s]",
    )
    server.add_argument(
        "--concurrency",
        type=positive,
        default=env("PHOTOMAKER_CONCURRENCY", 1, positive),
        help="requests handled at once; generations still run one at a time, so more only lets "
        "requests have their photos checked and wait inside the app instead of in the queue "
        "[PHOTOMAKER_CONCURRENCY, default %(default)s]",
    )
    return parser.parse_args(argv)


def service_config(args: argparse.Namespace) -> ServiceConfig:
    """Environment variables overridden by the flags given; on ZeroGPU the model goes to CUDA at startup."""
    config = ServiceConfig.from_env(model_settings(args))
    if SpacesConfig.zero_gpu and config.device is None:
        config.device = "cuda"
    return config
