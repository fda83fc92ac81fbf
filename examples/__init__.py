"""Command-line scripts (absl flags): train.py, evaluate.py; common.py holds their shared flags."""
