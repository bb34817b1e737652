"""Visualisation: per-frame plots and side-by-side videos of what was updated."""
