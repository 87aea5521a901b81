"""Generated tokens to text as it becomes final, cut at the first stop string.

A token's text can depend on the tokens around it (byte-level pieces of one character, a leading space), so each
new token is decoded with a few before it and its text is the difference; text is held back while it ends in a
partial character or in the start of a stop string.
"""

from __future__ import annotations


class TextStream:
    CONTEXT = 6  # tokens decoded before the new ones: enough for any character's bytes

    def __init__(self, decode, stops: list[str]):
        self._decode = decode
        self._stops = [s for s in stops if s]
        self._ids: list[int] = []
        self._done = 0  # tokens whose text is in self._decoded
        self._decoded = ""  # the text of ids[:_done]
        self._sent = 0
        self.text = ""
        self.stopped = False  # a stop string was met: the text ends before it

    def add(self, token: int) -> str:
        """The new final text after `token` ('' while it is held back, and after a stop)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        pending = self._pending()
        full = self._decoded + pending
        partial = pending.endswith("\ufffd")
        if not partial:  # the new tokens make whole characters: their text is settled
            self._decoded, self._done = full, len(self._ids)
        return self._cut(full, held=len(pending) if partial else 0)

    def finish(self) -> str:
        """What was held back, once no token follows."""
        if self.stopped:
            return ""
        full = self._decoded + self._pending()
        return self._emit(full, len(full))

    def _pending(self) -> str:
        """The text of the tokens after ids[:_done], decoded with a few tokens before them."""
        if self._done == len(self._ids):
            return ""
        start = max(0, self._done - self.CONTEXT)
        before, after = self._decode(self._ids[start:self._done]), self._decode(self._ids[start:])
        if after.startswith(before):
            return after[len(before):]
        whole = self._decode(self._ids)  # the context changed the earlier text: decode everything
        return whole[len(self._decoded):] if whole.startswith(self._decoded) else ""

    def _cut(self, full: str, held: int) -> str:
        start = max(0, self._sent - max((len(s) for s in self._stops), default=0))
        hits = [i for i in (full.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full, min(hits))
        settled = full[:len(full) - held]  # a partial character at the end is held, and a stop's start before it
        hold = held + max([0] + [n for s in self._stops for n in range(1, len(s)) if settled.endswith(s[:n])])
        return self._emit(full, max(self._sent, len(full) - hold))

    def _emit(self, full: str, end: int) -> str:
        piece = full[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        self.text = full[:self._sent]
        return piece
