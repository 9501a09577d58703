"""Glue for ML frameworks. Each module imports its framework; :mod:`oocseq` imports none."""
