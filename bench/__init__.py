"""p2pchat benchmark suite (issue 6): real processes, real mTLS, real SQLite, loopback only.

Run from the repository root: `python -m bench` (full) or `python -m bench --quick` (smoke run).
"""
