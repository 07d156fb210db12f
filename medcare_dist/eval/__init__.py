"""Evaluation: exam files, prompts, scoring, the model under test, per-record results, the report, and `medcare-dist eval` itself (run.py)."""
