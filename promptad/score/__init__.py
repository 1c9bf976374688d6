"""`promptad score`: the driver and its Ray Data pipeline (command.py), the plan of what to score
(plan.py), the committed Parquet output (output.py) and progress reporting (progress.py)."""
