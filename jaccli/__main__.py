"""``python -m jaccli`` and the ``jaccli`` console script.

Signal handling is installed before the CLI (Typer, Rich) is imported: Ctrl-C, SIGTERM
or SIGHUP during start-up then end with one line too, not an import traceback.
"""

import sys

from . import signals


def main() -> None:
    signals.install()
    try:
        from .cli import main as cli_main
    except (signals.Interrupted, KeyboardInterrupt) as exc:
        signals.exiting()
        if not isinstance(exc, signals.Interrupted):
            exc = signals.Interrupted()
        sys.stderr.write(f"error: interrupted ({exc.name})\n")
        sys.exit(exc.exit_code)
    cli_main()


if __name__ == "__main__":
    main()
