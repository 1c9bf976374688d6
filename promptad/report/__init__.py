"""The audit report: its data and report.json (summary.py), the HTML page (page.py) and its tables (tables.py), the plots."""
