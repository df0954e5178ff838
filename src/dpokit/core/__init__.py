"""Shared pieces below every stage: config, run folder, models, templates, scoring, sampling, judges, stats."""
