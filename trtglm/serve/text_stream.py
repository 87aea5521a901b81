"""Generated tokens to text as it becomes final, cut at the first stop string.

A token's text can depend on the tokens after it (byte-level pieces of one character, a leading space), so the
tokens so far are decoded whole each time, and text is held back while it ends in a partial character or in
the start of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, decode, stops: list[str]):
        self._decode = decode
        self._stops = [s for s in stops if s]
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""
        self.stopped = False  # a stop string was met: the text ends before it

    def add(self, token: int) -> str:
        """The new final text after `token` ('' while it is held back, and after a stop)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        full = self._decode(self._ids)
        start = max(0, self._sent - max((len(s) for s in self._stops), default=0))
        hits = [i for i in (full.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full, min(hits))
        hold = max((n for s in self._stops for n in range(1, len(s)) if full.endswith(s[:n])), default=0)
        if full.endswith("\ufffd"):  # a character whose bytes are not all there yet
            hold = max(hold, 1)
        return self._emit(full, max(self._sent, len(full) - hold))

    def finish(self) -> str:
        """What was held back, once no token follows."""
        if self.stopped:
            return ""
        return self._emit(self._decode(self._ids), None)

    def _emit(self, full: str, end: int | None) -> str:
        end = len(full) if end is None else end
        piece = full[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        self.text = full[:self._sent]
        return piece
