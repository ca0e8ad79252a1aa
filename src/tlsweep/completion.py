"""Shell completion: ``eval "$(tlsweep completion bash)"`` (or ``zsh``, through bashcompinit).

The script is generated with what this installation has: the commands and their options, the
config groups with their choices (``backbone=<TAB>``), the common keys, and the sweeps in
``sweeps/``. Completing never starts Python, so it is instant.
"""

from __future__ import annotations

import argparse
import shlex

from tlsweep.config import CONFIG_GROUPS, group_choices

KEYS = (
    "seed=",
    "head.pooling=",
    "head.dense_units=",
    "head.dropout=",
    "train.batch_size=",
    "train.epochs=",
    "train.fine_tune.epochs=",
    "optimizer.learning_rate=",
    "backbone.weights=",
    "backbone.input_size=",
    "data.path=",
    "cache.dir=",
    "tracking.uri=",
)
SWEEP_KEYS = ("sweep.n_trials=", "sweep.sampler=", "sweep.storage=", "sweep.study_name=")
VALUES = {
    "head.pooling": ("avg", "max", "flatten"),
    "backbone.weights": ("imagenet", "null"),
    "sweep.sampler": ("tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2", "nsga3"),
}
SCRIPT = """\
# tlsweep completion for bash (zsh: autoload -U bashcompinit && bashcompinit first)
_tlsweep() {{
    local line="${{COMP_LINE:0:COMP_POINT}}"
    local cur="${{line##* }}"
    local -a words=($line)
    local count=${{#words[@]}}
    [[ "$line" == *" " ]] && count=$((count + 1))
    local cmd="${{words[1]}}"
    local candidates=""
    if (( count <= 2 )); then
        candidates="{commands}"
    else
        case "$cmd" in
{options}
        esac
        if [[ "$cur" != -* ]]; then
            case "$cmd" in
                train) candidates="{keys}";;
                sweep)
                    if (( count == 3 )); then candidates="{sweeps}"
                    else candidates="{keys} {sweep_keys}"; fi;;
                runs|report|status) candidates="";;
            esac
            case "$cur" in
{values}
            esac
        fi
    fi
    COMPREPLY=($(compgen -W "$candidates" -- "$cur"))
    if [[ "$cur" == *=* ]]; then  # bash completes the part after the last '='
        local prefix="${{cur%=*}}="
        COMPREPLY=("${{COMPREPLY[@]#"$prefix"}}")
    fi
    [[ ${{#COMPREPLY[@]}} -eq 1 && "${{COMPREPLY[0]}}" == *= ]] && compopt -o nospace 2>/dev/null
    return 0
}}
complete -F _tlsweep tlsweep
"""


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The completion script for ``parser`` (the ``tlsweep`` command line)."""
    from tlsweep.sweepspec import available_sweeps

    commands = _subcommands(parser)
    options = "\n".join(
        f'            {name}) [[ "$cur" == -* ]] && candidates="{_options(sub)}";;'
        for name, sub in commands.items()
    )
    groups = {group: group_choices(group) for group in CONFIG_GROUPS}
    values = {**{group: tuple(choices) for group, choices in groups.items()}, **VALUES}
    value_cases = "\n".join(
        f'                {key}=*) candidates="{" ".join(f"{key}={v}" for v in choices)}";;'
        for key, choices in values.items()
    )
    return SCRIPT.format(
        commands=" ".join(commands),
        options=options,
        keys=" ".join([f"{group}=" for group in groups] + list(KEYS)),
        sweep_keys=" ".join(SWEEP_KEYS),
        sweeps=" ".join(shlex.quote(name) for name in available_sweeps()),
        values=value_cases,
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only there
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(sub: argparse.ArgumentParser) -> str:
    return " ".join(
        flag
        for action in sub._actions
        if action.help is not argparse.SUPPRESS
        for flag in action.option_strings
    )
