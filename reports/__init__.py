"""The HTML report builder (reports/build.py) and the data it reads (reports/data/)."""
