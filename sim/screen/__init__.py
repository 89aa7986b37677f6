"""Screening: sweep a scenario's search space, keep what meets the SLOs, rank it.

``space`` parses and validates the search section, ``runner`` evaluates configs in
parallel with a checkpoint, ``analysis`` derives goodput, cost and the Pareto
frontier and the shortlist, ``report`` writes the files.
"""
