"""What a category's normal images leave behind: coreset memory banks of patch features (bank.py)
and a Gaussian of whole-image statistics (gaussian.py)."""
