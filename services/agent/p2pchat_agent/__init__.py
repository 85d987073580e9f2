"""The p2pchat agent (one per user) and the CLI that drives it."""
