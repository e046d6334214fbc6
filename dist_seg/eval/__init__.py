"""Evaluation: confusion matrices and scores (``metrics``), dense CRF (``crf``), figures (``plots``).

Submodules are imported on demand so that CRF worker processes and metric-only users do not pay for
matplotlib or scipy imports they do not need.
"""
