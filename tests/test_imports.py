"""Every module of the distribution imports: a broken import in a rarely run path fails here, not in production."""

import importlib
import pkgutil

import pytest

PACKAGES = ("schemas", "indexer", "consumer", "workers", "ops")


def modules() -> list[str]:
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
    return names


@pytest.mark.parametrize("name", modules())
def test_module_imports(name):
    importlib.import_module(name)
