"""How the library reports its long steps: to a `Progress` the caller passes in (the command line renders
it with rich). The default reports nothing: the library never prints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Progress:
    """Steps with an optional total, and one-line notes. Subclass it to show them; this one is silent."""

    def start(self, description: str, total: int | None = None) -> int:
        """A new step; its id."""
        return 0

    def update(self, step: int, *, completed: int | None = None, total: int | None = None,
               description: str | None = None) -> None:
        pass

    def finish(self, step: int) -> None:
        pass

    def note(self, text: str) -> None:
        """Something worth a line of its own (an estimate, a choice made)."""

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[int]:
        step = self.start(description, total)
        try:
            yield step
        finally:
            self.finish(step)


SILENT = Progress()
