"""Fixtures of the container tests: a Docker engine, up-to-date images, and a deployment.

Without a Docker engine these tests skip, except with CI set, where they fail: CI must never
pass without running them. The images are (re)built by scripts/images.sh when missing or older
than the sources (a no-op when up to date, as after .ci/run's build); P2PCHAT_IMAGES_OFFLINE
(default auto) is passed to it as OFFLINE.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # testcontainers is imported only once it is known to be installed
    from tests.containers.harness import Deployment

# testcontainers reads these when imported. No Ryuk reaper container (its image cannot be
# pulled without a registry): the fixtures remove what they made themselves, pass or fail.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
os.environ.setdefault("TC_HOST", "localhost")

IN_CI = bool(os.environ.get("CI"))
ROOT = Path(__file__).resolve().parents[2]
IMAGE_BUILD_TIMEOUT = 1500


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"container tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_images() -> None:
    """A usable Docker engine and current p2pchat images, or skip (fail in CI)."""
    if importlib.util.find_spec("testcontainers") is None:
        unavailable("the testcontainers package is not installed (make install)")
    from tests.containers import harness

    problem = harness.docker_problem()
    if problem is not None:
        unavailable(problem)
    problem = build_images()
    if problem is not None:
        unavailable(problem)
    harness.sweep_stale()


def build_images(**extra_env: str) -> str | None:
    """Runs scripts/images.sh (with `extra_env`, e.g. SCALE="1"); what went wrong, or None."""
    env = {
        **os.environ,
        "OFFLINE": os.environ.get("P2PCHAT_IMAGES_OFFLINE", "auto"),
        **extra_env,
    }
    what = " ".join(["scripts/images.sh", *(f"{k}={v}" for k, v in extra_env.items())])
    try:
        result = subprocess.run(
            [str(ROOT / "scripts" / "images.sh")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=IMAGE_BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{what} took more than {IMAGE_BUILD_TIMEOUT} s"
    return None if result.returncode == 0 else f"{what} failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def deployment(docker_images: None) -> Iterator[Deployment]:
    """The directory and agents alice, bob (driven through the CLI in their containers) and
    carol (driven through her control API from the host), all healthy, on a private network."""
    from tests.containers.harness import Deployment

    deployment = Deployment()
    try:
        deployment.start_directory()
        deployment.wait_healthy(["directory"])
        deployment.start_agent("alice")
        deployment.start_agent("bob")
        deployment.start_agent("carol", remote_control=True)
        deployment.wait_healthy(["alice", "bob", "carol"])
        yield deployment
    finally:
        deployment.close()
