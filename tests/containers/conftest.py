"""The containers layer: every image built by `make images`' own script (scripts/images.sh) from the
unchanged Dockerfiles, once per session, then run with podman. Nothing here skips: a machine
without podman fails these tests (scripts/system-deps.sh test installs it)."""

from __future__ import annotations

import pytest

from devstack.containers import Podman, api_pod, free_port

# The first test of a session builds the base and the images (about 3 minutes on a fresh machine,
# seconds from podman's cache afterwards); pytest-timeout counts fixture setup in the test's time.
BUILD_TIMEOUT = 1200

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "correct horse battery staple"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.parent.name == "containers":
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT))


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def images(podman) -> str:
    """The report of scripts/images.sh: one line per image with its size and build time."""
    report = podman.build_images()
    print(report)
    return report


@pytest.fixture(scope="session")
def ui_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def pod(podman, images, tmp_path_factory, ui_port):
    """The API pod, with an admin account and the Swagger UI container's origin allowed by CORS;
    removed once this package's tests are done (session-scoped, it ran beside every later suite)."""
    with api_pod(podman, tmp_path_factory.mktemp("pod"), cors_origins=f"http://127.0.0.1:{ui_port}",
                 env={"PAYMENTS_ADMIN_EMAIL": ADMIN_EMAIL, "PAYMENTS_ADMIN_PASSWORD": ADMIN_PASSWORD}) as p:
        yield p
