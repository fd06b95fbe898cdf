"""The options the ``jaccli`` commands share, declared once as Typer annotations.

Torch-free on purpose: Typer reads these to build ``--help`` and shell completion,
which must not pay for importing torch.
"""

import sys
from typing import Annotated, Literal, Optional

import typer

from jaccli.request.choices import ACTIVATION_NAMES, COMPILE, DTYPE_NAMES, MODES

# Every option with a fixed set of values is typed as a Literal of that set: Typer lists
# the values in --help (<auto|forward|reverse>) and refuses any other while it parses
# the command line, before a command runs and imports torch.


def _complete(choices):
    """Shell completion of an option with a fixed set of values."""

    def complete(incomplete: str):
        return [c for c in choices if c.startswith(incomplete)]

    return complete


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL", help="TorchScript archive, torch.export .pt2, safetensors MLP, or weights with --arch.", show_default=False
    ),
]
InputArg = Annotated[
    Optional[str],
    typer.Argument(
        metavar="INPUT", help="Input tensor file (.npy .npz .pt .safetensors .csv .txt), or - for .npy on stdin.", show_default=False
    ),
]
PerSample = Annotated[
    bool,
    typer.Option("--per-sample", "-p", help="Axis 0 of the input holds independent points: one derivative per point."),
]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.", autocompletion=_complete(("cpu", "cuda", "mps")))]
Dtype = Annotated[
    Optional[Literal[DTYPE_NAMES]],
    typer.Option(help="Compute in this dtype \\[default: the input's float dtype]", show_default=False),
]
Mode = Annotated[
    Literal[MODES],
    typer.Option(help="auto picks the engine and mode predicted fastest, timing the close ones (--json shows the estimates and --verbose what was timed)."),
]
CompileOpt = Annotated[
    Literal[COMPILE],
    typer.Option(
        "--compile",
        help="Fused Taylor kernels (torch.compile, cached on disk): auto compiles once the time already spent "
        "pays for it (long or streamed runs), on at once, off never.",
    ),
]
Select = Annotated[
    Optional[str],
    typer.Option(
        metavar="INDEX|argmax|argmin",
        help="Differentiate only these elements of each point's output: an index or slice of one point's output "
        "(2, ':, 3', 0:5) or, per point, its largest (argmax: the predicted class) or smallest element. The other "
        "elements cost nothing.",
        show_default=False,
    ),
]
Summary = Annotated[
    bool,
    typer.Option(
        "--summary",
        help="Jacobian: per point ‖J‖_F, σ_max, σ_min, condition number, log|det J| (square maps); Hessian: extreme "
        "eigenvalues and definiteness; other results: their values' distribution. Min / median / max over the points.",
    ),
]
ChunkSize = Annotated[
    Optional[int],
    typer.Option(
        help="Points per pass with --per-sample, directions per pass otherwise \\[default: chosen to bound memory]",
        show_default=False,
    ),
]
Save = Annotated[
    Optional[str],
    typer.Option(
        help="Write the result: .npy, .npz, .pt or .safetensors by suffix; - writes it to stdout (.npy for one tensor, "
        ".npz for several).",
        show_default=False,
    ),
]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing --save or --plot file.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary (schema in the README).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and warnings.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan (mode, chunking, result size, peak memory) and compute nothing.")
]
Key = Annotated[Optional[str], typer.Option(help="Tensor to use from an INPUT file that holds several.", show_default=False)]
Inputs = Annotated[
    Optional[list[str]],
    typer.Option("--input", "-i", help="NAME=FILE[:KEY] for a model argument; repeat for several.", show_default=False),
]
Wrt = Annotated[
    Optional[list[str]],
    typer.Option(help="Argument to differentiate (repeat for several); the others are held constant.", show_default=False),
]
Output = Annotated[
    Optional[str], typer.Option(help="Index or name of the output to use when the model returns several.", show_default=False)
]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Say which engine ran and why (e.g. the op that keeps the fast path off).")
]
Strict = Annotated[bool, typer.Option("--strict", help="Fail (exit 5) instead of warning when values are NaN or Inf.")]
Arch = Annotated[
    Optional[str],
    typer.Option(
        help="For weights-only MODEL files (safetensors, state dict): mlp, or FILE.py:FUNC / package.module:FUNC "
        "returning the nn.Module. A factory imports and runs that code.",
        show_default=False,
    ),
]
Activation = Annotated[
    Optional[Literal[ACTIVATION_NAMES]], typer.Option(help="Activation of --arch mlp.", show_default=False)
]
ArchKwargs = Annotated[
    Optional[str], typer.Option("--arch-kwargs", help="JSON object of keyword arguments for the --arch factory.", show_default=False)
]
Show = Annotated[
    str,
    typer.Option(
        metavar="N|all",
        autocompletion=_complete(("1", "all")),
        help="With --per-sample, how many points (from the first) are printed as tables; all for every point "
        "(at most 100).",
    ),
]
Digits = Annotated[int, typer.Option(help="Significant digits of the numbers in tables.")]
PlotFile = Annotated[
    Optional[str],
    typer.Option(
        metavar="FILE",
        help="Draw the result into FILE (.png, .svg or .pdf): derivatives against the input for one coordinate "
        "per point, else a heat map; with --summary also the spectra. Needs pip install 'jaccli\\[plot]'.",
        show_default=False,
    ),
]
NoBatchCheck = Annotated[
    bool,
    typer.Option("--no-batch-check", help="Skip the check that the model does not mix batch elements (--per-sample)."),
]


def _set_max_input(ctx: typer.Context, value: Optional[str]) -> None:
    if ctx.resilient_parsing:  # shell completion parses the line too, and must stay torch-free
        return None
    if value is None and "jaccli.io.sources" not in sys.modules:
        # nothing set yet in this process: the default holds, and importing the reader (and
        # torch) now would make the refusal of a bad option value wait for torch
        return None
    from jaccli.io.sources import set_max_input_bytes

    set_max_input_bytes(value)  # None: $JACCLI_MAX_INPUT_BYTES, else the 4 GiB default
    return None


MaxInputBytes = Annotated[
    Optional[str],
    typer.Option(
        "--max-input-bytes",
        metavar="SIZE",
        help="Largest MODEL or INPUT file (or stream) to read, e.g. 512M or 16G; larger ones are refused (exit 6) "
        "before they are read. Also JACCLI_MAX_INPUT_BYTES. \\[default: 4G]",
        show_default=False,
        callback=_set_max_input,
        expose_value=False,
    ),
]
ProgressOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--progress/--no-progress",
        help="Show a progress bar on stderr (points, points/s, time left). By default it shows when stderr is a "
        "terminal and the work runs over a second; never with --json or --quiet.",
        show_default=False,
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run that was streaming to --save FILE.npy/.safetensors from its last "
        "recorded chunk (the model, input, command and options must be the same).",
    ),
]
