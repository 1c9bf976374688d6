"""`promptad audit`: the driver (command.py), its Ray stages (stages.py) and the go / no-go
verdict from the numbers (verdict.py)."""
