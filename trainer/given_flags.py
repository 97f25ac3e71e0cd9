"""Which `train` flags the user typed, and the refusal of those a run would ignore.

Why the command line and not the parsed namespace: argparse gives every flag a value (the
default recipe's, trainer/recipe.py, for rnn/gru/lstm), so only argv tells a flag the user
gave from a default. One check for every kind of run: `--task forecast` refuses the language
models' flags, `--arch ngram|hmm` the recurrent models' (trainer/cli.py), by the same rule
and in the same words, rather than training while ignoring them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rnnserve.trainer.errors import TrainerError


def flag_name(dest: str) -> str:
    """The option string of an argparse dest: `num_steps` -> `--num-steps`."""
    return "--" + dest.replace("_", "-")


def given(argv: Sequence[str], dest: str) -> bool:
    """Whether the flag of `dest` is on the command line, as `--flag V` or `--flag=V` (`train`
    takes no abbreviations: allow_abbrev=False)."""
    flag = flag_name(dest)
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def refuse_unused(
    argv: Sequence[str], owners: Mapping[str, Sequence[str]], target: str, hint: str = ""
) -> None:
    """Raises TrainerError naming every flag of `owners` ({who uses them: dests}) that is on
    the command line: `--hidden, --lr apply to rnn/gru/lstm, not to --arch ngram{hint}`."""
    parts = []
    for owner, dests in owners.items():
        flags = [flag_name(dest) for dest in dests if given(argv, dest)]
        if flags:
            verb = "applies" if len(flags) == 1 else "apply"
            parts.append(f"{', '.join(flags)} {verb} to {owner}")
    if parts:
        raise TrainerError(f"{', '.join(parts)}, not to {target}{hint}")
