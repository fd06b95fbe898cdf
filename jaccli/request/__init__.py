"""What a user can ask for, as names and values: torch-free.

==================  ====================================================================
:mod:`.choices`     the names users choose from (commands, modes, estimators, dtypes,
                    activations): one tuple each, read by the CLI's ``--help`` and by the
                    core modules that give them meaning
:mod:`.names`       names of partial derivatives (``u_txx``) and ``NAME = EXPR``
                    expressions, parsed against a whitelist (never ``eval``)
:mod:`.kinds`       the registry of derivative kinds: one record per command (name,
                    shape and axes, layout, summary, engine entry, help and examples)
:mod:`.spec`        the typed request (source, derivative, output options) a command
                    builds once, and ``--select``
==================  ====================================================================

Imports: the standard library and :mod:`jaccli.errors` only, so that the CLI can check a
request before torch is imported.
"""
