"""Ingestion: sources (arrays, images, CSV, NPY, DataFrames) -> one streaming writer."""
