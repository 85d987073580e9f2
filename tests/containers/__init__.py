"""Integration tests on real containers (marker `containers`): see conftest.py."""
