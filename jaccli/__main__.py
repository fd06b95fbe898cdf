"""``python -m jaccli`` and the ``jaccli`` console script.

Signal handling is installed before the CLI (Typer, Rich) is imported: Ctrl-C, SIGTERM
or SIGHUP during start-up (importing, or Typer building the commands) then end with one
line too, not a traceback. Only the interpreter's own first milliseconds, before any of
jaccli runs, are out of reach.
"""

from jaccli import signals
from jaccli.cli import collector


def _cli() -> None:
    from jaccli.cli.main import app

    app()


def main() -> None:
    collector.pause()  # until the model is loaded: start-up's full collections would free nothing
    signals.run(_cli)


if __name__ == "__main__":
    main()
