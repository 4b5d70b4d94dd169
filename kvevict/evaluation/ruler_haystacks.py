"""Haystacks of a given size, as segments (needles go between segments) and the joiner of the
segments. `n` counts the haystack's units, fine enough that one unit is far below 2% of a
1024-token prompt: a sentence of noise, a word of prose."""

from __future__ import annotations

from kvevict.evaluation.ruler_sources import NOISE, NOISE_SENTENCES, prose_sentences

NOISE_JOINER = "\n"  # RULER's "repeat" haystack: the noise paragraph on lines
PROSE_JOINER = " "   # RULER's "essay" haystack: sentences of running text


def noise_segments(n: int) -> list[str]:
    """`n` noise sentences as lines of the whole noise paragraph, the last line possibly partial."""
    full, rest = divmod(n, len(NOISE_SENTENCES))
    return [NOISE] * full + ([" ".join(NOISE_SENTENCES[:rest])] if rest else [])


def prose_segments(start: int, n: int) -> list[str]:
    """The first `n` words of the manual's prose from sentence `start` on (wrapping around), one
    segment per sentence; the last sentence is cut where the words run out (as RULER cuts its
    essays at a word)."""
    sentences = prose_sentences()
    segments, left, index = [], n, start
    while left > 0:
        words = sentences[index % len(sentences)].split(" ")[:left]
        segments.append(" ".join(words))
        left -= len(words)
        index += 1
    return segments
