"""Reporting: per-phase client profiles (`profiling`), the run's summary tables, CSV/JSON and plots (`summary`), and
per-round loggers (TensorBoard, W&B: `loggers`)."""
