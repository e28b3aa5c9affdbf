"""Aggregates of per-image records: hMean/gMean, per-method means (no torch, no model code)."""
