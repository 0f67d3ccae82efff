"""A registry of the modules of one package, each an entry named by its NAME: what makes adding
an adapter kind or an init one new module (pissa.adapters.kinds, pissa.adapters.inits)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cached_property
from types import ModuleType
from typing import Sequence

from pissa.errors import PissaError


class Registry:
    """Every module of `package` (imported on first use), by NAME, listed in `order` first.

    Args:
        package: the package's name; path: its __path__; what: the entries in words ("adapter
            kind"), for errors.
    """

    def __init__(self, package: str, path: Sequence[str], order: Sequence[str], what: str):
        self.package, self.path, self.order, self.what = package, list(path), tuple(order), what

    @cached_property
    def entries(self) -> dict[str, ModuleType]:
        found = {}
        for info in pkgutil.iter_modules(self.path):
            module = importlib.import_module(f"{self.package}.{info.name}")
            found[module.NAME] = module
        rank = {name: i for i, name in enumerate(self.order)}
        return dict(sorted(found.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, name: str) -> ModuleType:
        """The module called `name`.

        Raises:
            PissaError: for an unknown name, listing the known ones.
        """
        if name not in self.entries:
            raise PissaError(f"unknown {self.what} {name!r}; choose one of {', '.join(self.entries)}")
        return self.entries[name]
