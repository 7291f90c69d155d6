"""Help text shared by every command: metavars that say what a value looks like, and examples.

Applied once to the click command tree in :func:`robaudit.cli.main`, so that a command module
only declares its options; a new option gets a metavar from its type when it has no entry here.
"""

from __future__ import annotations

from typing import Any

#: What each option's value looks like (shown after the flag in ``--help``).
METAVARS = {
    "--epsilon": "E",
    "--crash": "N|N1,N2,..",
    "--byzantine": "N|N1,N2,..",
    "--synapse": "N|N1,N2,..",
    "--tolerate": "N|N1,N2,..",
    "--bit-flip": "N|N1,N2,..",
    "--capacity": "C",
    "--failure-range": "A,B",
    "--input-range": "LO,HI",
    "--activation-bound": "Y",
    "--input-shape": "D1,D2,..",
    "--mode": "crash|byzantine|bit_flip|stuck_at",
    "--stuck-at": "0|1",
    "--method": "tight|paper",
    "--search": "random|worst",
    "--output": "FILE.yaml|FILE.json|TENSOR",
    "--report": "FILE.yaml|FILE.json",
    "--output-tensor": "TENSOR",
    "--inputs": "FILE.npy|FILE.npz",
    "--labels": "FILE.npy|FILE.npz",
    "--plot": "FILE.png",
    "--policy": "FILE",
    "--baseline": "REPORT.yaml",
    "--junit": "FILE.xml",
    "--replay": "REPORT",
    "--write": "FILE.onnx",
    "--layer": "NAME",
    "--require-layer": "NAME=N",
    "--timeout": "SECONDS",
    "--workers": "N",
    "--radius": "R",
    "--margin": "M",
    "--confidence": "C",
    "--shard": "I/N",
    "--backend": "local|ray",
    "--address": "HOST:PORT",
}

#: Where one command's option takes other values than the same flag elsewhere.
COMMAND_METAVARS = {
    "harden": {"--output": "FILE.onnx"},
    "merge": {"--output": "FILE.yaml|FILE.json", "--format": "yaml|json"},
}

#: Fallback metavars by click type name.
_BY_TYPE = {
    "int": "N",
    "int range": "N",
    "float": "X",
    "float range": "X",
    "path": "FILE",
    "filename": "FILE",
    "str": "TEXT",
}

#: Examples shown at the end of each command's ``--help`` (commands not registered are skipped).
EXAMPLES = {
    "inspect": ["robaudit inspect model.onnx", "robaudit inspect model.onnx --input-shape 3,224,224"],
    "bound": [
        "robaudit bound model.onnx -e 0.5",
        "robaudit bound model.onnx -e 0.5 --crash 2,1,0",
        "robaudit bound model.onnx --byzantine 1 --capacity 10 --report bound.yaml",
    ],
    "inject": [
        "robaudit inject model.onnx --crash 1 -e 0.5",
        "robaudit inject model.onnx --crash 2 --search worst --inputs val.npz --labels val.npz",
        "robaudit inject model.onnx --replay report.json",
        "robaudit inject model.onnx --crash 1 --trials 10000 --workers 4 --shard 0/2 -o shard0.json",
    ],
    "check": [
        "robaudit check                      # the policy in ./robaudit.yaml",
        "robaudit check model.onnx -e 0.5 --require-crash 1 --require-layer fc1=2",
        "robaudit check --baseline old-report.yaml --report report.yaml --junit junit.xml",
    ],
    "precision": ["robaudit precision model.onnx -e 0.05", "robaudit precision model.onnx -e 0.05 --inputs val.npz"],
    "wait": ["robaudit wait model.onnx -e 0.5", "robaudit wait model.onnx -e 0.5 --check"],
    "design": [
        "robaudit design model.onnx -e 0.5 --tolerate 2",
        "robaudit design model.onnx --tolerate 1 --write scaled.onnx",
    ],
    "certify": ["robaudit certify model.onnx --inputs val.npz --crash 1"],
    "harden": ["robaudit harden model.onnx --inputs val.npz -o hardened.onnx"],
    "merge": ["robaudit merge shard0.json shard1.json --output report.json"],
}

#: Where to read more (shown under the examples).
MORE = "Method and assumptions: docs/method.md; every flag and report key: README.md."


def metavar_for(param: Any, command: str = "") -> str | None:
    """The metavar of one click parameter of ``command`` (None: leave it to click, e.g. for flags)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    own = COMMAND_METAVARS.get(command, {})
    for opt in getattr(param, "opts", []):
        if opt in own:
            return own[opt]
    if param.param_type_name == "argument":
        name = (param.name or "value").upper()
        return f"{name}..." if param.nargs != 1 else name
    for opt in param.opts:
        if opt in METAVARS:
            return METAVARS[opt]
    if param.opts and param.opts[0].startswith("--require-"):
        return "N"
    choices = getattr(param.type, "choices", None)
    if choices:
        return "|".join(str(c) for c in choices)
    return _BY_TYPE.get(getattr(param.type, "name", ""), "VALUE")


def polish(group: Any) -> None:
    """Set metavars and examples on every command of the click group."""
    group.epilog = (
        "\b\nExamples:\n  robaudit bound model.onnx -e 0.5\n  robaudit inject model.onnx --crash 1 -e 0.5\n"
        "  robaudit check model.onnx -e 0.5 --require-crash 1\n\nEach command: robaudit COMMAND -h. " + MORE
    )
    for name, command in getattr(group, "commands", {}).items():
        for param in command.params:
            metavar = metavar_for(param, name)
            if metavar is not None:
                param.metavar = metavar
            if metavar is not None and param.param_type_name == "argument":
                # Typer writes a required argument as {NAME} in the usage line; show NAME.
                shown = metavar if param.required else f"[{metavar}]"
                param.make_metavar = lambda ctx=None, usage=False, shown=shown: shown
        lines = EXAMPLES.get(name)
        if lines:
            command.epilog = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines) + "\n\n" + MORE
