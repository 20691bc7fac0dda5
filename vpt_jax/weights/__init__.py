"""Readers of published weight files (no model code here)."""
