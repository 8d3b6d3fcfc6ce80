"""PhotoMaker training (issue 12): the paper's recipe on accelerate. See loop.py for the order of things."""

from .cli_args import add_train_arguments, run_train_command

__all__ = ["add_train_arguments", "run_train_command"]
