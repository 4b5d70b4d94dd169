"""Incremental detokenization with stop strings, for streaming generated text.

Token boundaries are not character boundaries: a byte-level BPE token can hold half of a UTF-8
character, which decodes to U+FFFD until the rest arrives. `TextStream` decodes a window of the
generated ids (the previous delta's tokens, as context for tokenizers whose decoding depends on
the preceding token, plus the new ones) and emits only the text past the window's known prefix,
holding it back while it ends in an incomplete character. With byte-level BPE and SentencePiece
decoders the deltas concatenate to `tokenizer.decode(all_ids)`; decoding a window instead of
every id so far keeps the cost of a token independent of the length generated.

Stop strings: text that could be the start of a stop string is held back until it is known
not to be one; when a stop string appears, the text before it is released and the rest (the
stop string and what follows) never is.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed generated token ids one at a time; get the text each one adds."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.stopped = False  # a stop string appeared: nothing more is released
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this are released
        self._held = ""  # decoded text held back as a possible start of a stop string
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def push(self, token_id: int) -> str:
        """Adds one generated token; returns the text it releases (often empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._release(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """Releases what is still held (an incomplete character is released as U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        known = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(known) and (final or not text.endswith(REPLACEMENT)):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(known):]
        return ""

    def _release(self, new_text: str, final: bool) -> str:
        text = self._held + new_text
        self._held = ""
        if not self.stop:
            return text
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return text[:min(found)]
        if not final:
            keep = self._stop_prefix_length(text)
            if keep:
                self._held = text[-keep:]
                return text[:-keep]
        return text

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that a stop string starts with."""
        for length in range(min(len(text), self._longest_stop - 1), 0, -1):
            suffix = text[-length:]
            if any(s.startswith(suffix) for s in self.stop):
                return length
        return 0
