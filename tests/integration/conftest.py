"""Fixtures shared by the integration tests."""

from tests.support.cluster import cluster

__all__ = ["cluster"]
