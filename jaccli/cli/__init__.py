"""The ``jaccli`` command: a thin Typer layer over the public API of :mod:`jaccli`.

==================  ====================================================================
:mod:`.main`        the Typer app, its commands and the one error line with its exit code
:mod:`.partials`    the ``partials`` command
:mod:`.curvature`   the ``curvature`` and ``grads`` commands (parameter space)
:mod:`.run`         the one request path: early checks, load, plan, compute, then save,
                    summarise, plot and show the same way for every command
:mod:`.example_models`  the example models ``jaccli example`` writes (imports torch;
                    imported by that command only)
:mod:`.options`     the options the commands share, as Typer annotations
:mod:`.inputs`      MODEL, INPUT and the loading options → a model and its arguments
:mod:`.allocator`   glibc's allocator tuned for tensor work, for this process only
:mod:`.collector`   Python's garbage collector held off while the process starts
==================  ====================================================================

Start-up is torch-free: every module here imports the core inside the functions that
need it, so ``--help`` and option errors answer before torch is imported. The CLI may
import every layer; nothing imports it.
"""
