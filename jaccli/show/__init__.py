"""Showing results: Rich tables and versioned JSON, summaries, pictures, progress.

==================  ====================================================================
:mod:`.layout`      a result's axes as points, output components, labelled rows and
                    columns (torch-free)
:mod:`.summary`     spectra, determinants and definiteness per point; the distribution
                    of values over the points (``--summary`` of the other kinds)
:mod:`.render`      a command's report: Rich output for people and versioned JSON for
                    programs; the views of a plan, ``info`` and ``check``
:mod:`.tables`      a result's blocks as labelled tables (previews of large ones, terminal
                    pictures of small ones) and the ``--summary`` tables
:mod:`.partials`    ``jaccli partials``: gates, its JSON document and its table
:mod:`.plot`        matplotlib pictures (the optional ``plot`` extra, imported on use)
:mod:`.progress`    the progress bar on stderr
:mod:`.curvature`   tables of ``jaccli curvature`` / ``grads``, the spectral-density plot
==================  ====================================================================

Imports: :mod:`jaccli.curvature` (its results), :mod:`jaccli.engine` (plans), :mod:`jaccli.io`
(atomic writes), the layers below (what differs between kinds — titles, symbols, block layout —
is read from :mod:`jaccli.request.kinds`); never the CLI. Nothing is imported here at package
import: :mod:`.render`, :mod:`.partials` and
:mod:`.summary` load torch.
"""
