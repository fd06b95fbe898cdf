"""What a user can ask for, as names and values: torch-free.

==================  ====================================================================
:mod:`.choices`     the names users choose from (commands, modes, estimators, dtypes,
                    activations): one tuple each, read by the CLI's ``--help`` and by the
                    core modules that give them meaning
:mod:`.names`       names of partial derivatives (``u_txx``) and ``NAME = EXPR``
                    expressions, parsed against a whitelist (never ``eval``)
==================  ====================================================================

Imports: the standard library and :mod:`jaccli.errors` only, so that the CLI can check a
request before torch is imported.
"""
