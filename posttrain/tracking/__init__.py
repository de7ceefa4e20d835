"""Metric sinks (JSONL, TensorBoard), progress display, plots and reports."""
