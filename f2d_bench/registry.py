"""Plugin registries: built-ins listed lazily as ``module:Class``, third parties through entry points.

Listing names never imports model code; a plugin's module is imported only when it is loaded.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib import metadata

from f2d_bench.errors import ConfigError


@dataclass(frozen=True)
class PluginEntry:
    name: str
    target: str  # "package.module:Class"
    summary: str
    origin: str  # "built-in" or the distribution that provides it


class Registry:
    """Named plugins of one kind (methods, scorers).

    ``builtins`` maps a name to ``("module:Class", one-line summary)``. Entry points of ``group``
    add third-party plugins; a third-party name that clashes with a built-in is ignored (built-ins win,
    so a stray package cannot silently change what a name measures).
    """

    def __init__(self, kind: str, group: str, builtins: dict[str, tuple[str, str]]):
        self.kind = kind
        self.group = group
        self._builtins = {
            name: PluginEntry(name, target, summary, "built-in") for name, (target, summary) in builtins.items()
        }

    def entries(self) -> dict[str, PluginEntry]:
        found = dict(self._builtins)
        for ep in metadata.entry_points(group=self.group):
            if ep.name in found:
                continue
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else "entry point"
            found[ep.name] = PluginEntry(ep.name, ep.value, "", origin)
        return dict(sorted(found.items()))

    def names(self) -> list[str]:
        return list(self.entries())

    def load(self, name: str) -> type:
        """Import and return the plugin class registered as ``name``."""
        entries = self.entries()
        if name not in entries:
            close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Installed {self.kind}s: {', '.join(entries)}"
            )
        target = entries[name].target
        module_name, _, attr = target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{self.kind} {name!r} ({target}) cannot be loaded: {exc}") from exc
        return obj
