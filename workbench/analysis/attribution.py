"""Causal attribution of the loss to experts (the analysis face of `workbench.attribution`).

Needs the live model (`model=`); see workbench/attribution.py for the definitions.
"""

from ..attribution import add_arguments, analyze, figures, options_from_args  # noqa: F401
