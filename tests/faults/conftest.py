from tests.integration.conftest import *  # noqa: F403  (the same fixtures: Redis, dockerd, API, workers)
