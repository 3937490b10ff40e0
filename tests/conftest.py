from __future__ import annotations

import os
from pathlib import Path

import pytest

# The model hub is unreachable on test machines: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flagmatch.settings import Settings  # noqa: E402
from tests.helpers import save_tiny_timm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vit_tiny_patch16_384-shaped timm model with random weights, in the hub layout."""
    return save_tiny_timm(tmp_path_factory.mktemp("models") / "tiny-nsfw")


@pytest.fixture(scope="session")
def tiny_embedder(tiny_model_dir: Path):
    from indexer.models.embed import load_model
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def opennsfw():
    from indexer.models.embed import load_model
    return load_model("opennsfw")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


ENGINES = ("sqlite", "postgresql")


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases():
    yield
    from tests.helpers import pg
    pg.drop_all()


def _catalog_for(engine: str):
    """"" (SQLite in the home directory) or a new database on the PostgreSQL server, dropped afterwards."""
    if engine == "sqlite":
        yield ""
        return
    from tests.helpers import pg
    url = pg.create_database()
    yield url
    pg.drop_database(url)


@pytest.fixture(params=ENGINES)
def catalog_url(request: pytest.FixtureRequest):
    """The catalog each store-using test runs against: SQLite in the home directory, then a database of
    its own on the real PostgreSQL server (skipped, with the reason, where there is none)."""
    yield from _catalog_for(request.param)


@pytest.fixture(scope="module", params=ENGINES)
def module_catalog_url(request: pytest.FixtureRequest):
    """``catalog_url`` for a module's shared store (the API and viewer tests, which copy it per test)."""
    yield from _catalog_for(request.param)


@pytest.fixture
def settings(home: Path, tiny_model_dir: Path, catalog_url: str) -> Settings:
    return Settings.load({"home": str(home), "model": str(tiny_model_dir), "batch_size": 8,
                          "catalog_url": catalog_url}, environ={})


@pytest.fixture
def store(settings: Settings):
    from flagmatch.wiring import open_store
    s = open_store(settings)
    yield s
    s.close()
