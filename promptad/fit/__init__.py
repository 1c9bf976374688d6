"""`promptad fit`: the driver (command.py), its Ray stages (stages.py, train.py), run bookkeeping
(runs.py), the same steps in one process (pipeline.py) and the leave-one-out calibration."""
