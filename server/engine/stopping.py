"""stopping: find stop sequences in streamed text, holding back a tail that could begin one."""
from __future__ import annotations


class StopSequenceMatcher:
    def __init__(self, stop_sequences: list[str]):
        self.stops = [s for s in stop_sequences if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit now, stopped). After stopped, the rest is discarded."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:   # longest suffix of pending that is a proper prefix of a stop sequence
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
