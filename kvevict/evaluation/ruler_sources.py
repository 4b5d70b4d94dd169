"""Local text for the suite's haystacks, all of it shipped with CPython (no download):

* `NOISE`: RULER's repeated filler ("The grass is green. ...");
* `prose_sentences()`: plain English sentences cleaned from the Python reference manual's text
  in `pydoc_data.topics` (our stand-in for RULER's Paul Graham essays);
* `prose_words()`: the lowercase words of that prose (common-words extraction draws from them);
* `KEY_ADJECTIVES` x `KEY_NOUNS`: RULER-style "adjective-noun" needle keys;
* `code_file()`: the held-out standard-library files of the shipped `demo-py` checkpoint.

Everything here is a pure function of the running CPython's files, so the same interpreter
version gives the same suite; another version ships another manual and standard library.
"""

from __future__ import annotations

import re
import sysconfig
from functools import cache
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = tuple(sentence + "." for sentence in NOISE[:-1].split(". "))

# Held out of models/demo-py's training data (its README), so that model has never seen them;
# heapq.py, held out too, is left out: a 4.7 kB string literal near its top leaves a short
# prompt nowhere to insert a statement at most depths.
CODE_FILES = ("calendar.py", "fractions.py", "shlex.py", "textwrap.py")

KEY_ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "broken", "calm", "clever", "cold", "crimson",
    "curious", "damp", "dark", "distant", "dusty", "eager", "empty", "faint", "fancy", "fierce",
    "fragile", "frozen", "gentle", "giant", "golden", "grumpy", "hidden", "hollow", "humble", "icy",
    "jolly", "lazy", "little", "lively", "lonely", "lucky", "marble", "merry", "misty", "modest",
    "narrow", "noisy", "odd", "pale", "plain", "proud", "purple", "quiet", "rapid", "rough",
    "rusty", "scarlet", "shiny", "silent", "silver", "sleepy", "slow", "smooth", "sour", "steady",
    "sticky", "stormy", "sunny", "tame", "tender", "tiny", "velvet", "wandering", "wild", "windy",
    "wise", "wooden", "young", "zesty",
)
KEY_NOUNS = (
    "anchor", "apple", "badger", "basket", "beacon", "bottle", "bridge", "button", "cabin", "candle",
    "canyon", "carpet", "castle", "cedar", "comet", "compass", "cottage", "crystal", "dolphin", "drum",
    "falcon", "feather", "forest", "fountain", "garden", "glacier", "harbor", "helmet", "island", "kettle",
    "lantern", "lemon", "lizard", "meadow", "mirror", "monkey", "mountain", "needle", "ocean", "orchard",
    "otter", "palace", "pebble", "pepper", "piano", "pillow", "planet", "pocket", "pumpkin", "rabbit",
    "raven", "river", "rocket", "saddle", "shadow", "spoon", "squirrel", "statue", "storm", "teapot",
    "thistle", "tiger", "tower", "trumpet", "tulip", "turtle", "valley", "violin", "wagon", "walnut",
    "whale", "window", "wizard", "zebra",
)

_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                         "\u2013": "-", "\u2014": "-"})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_EMPHASIS = re.compile(r'(?<![\w"*])\*{1,2}(\w[\w\s,-]*?\w|\w)\*{1,2}(?![\w"*])')
_NOT_PROSE = set("`[]{}<>|\\=#@$^~_*")


def _blocks(text: str) -> list[list[str]]:
    """Runs of non-blank lines."""
    blocks, block = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    return blocks


def _prose_paragraphs(text: str) -> list[str]:
    """Unindented paragraphs and bullet items; code, grammar and headings are indented or
    underlined in the manual's text rendering, so they drop out."""
    paragraphs = []
    for block in _blocks(text.translate(_QUOTES)):
        if block[0].startswith("* "):
            if any(not line.startswith("  ") for line in block[1:]):
                continue
            block = [block[0][2:]] + block[1:]
        elif any(line.startswith(" ") for line in block):
            continue
        if len(block) >= 2 and set(block[-1].strip()) <= set("*=-~^"):
            continue  # a heading
        paragraphs.append(" ".join(line.strip() for line in block))
    return paragraphs


def _is_plain_sentence(sentence: str) -> bool:
    words = sentence.split()
    return (sentence.isascii() and sentence[0].isupper() and sentence.endswith(".")
            and 6 <= len(words) <= 40 and not _NOT_PROSE & set(sentence)
            and sentence.count("(") == sentence.count(")") and sentence.count('"') % 2 == 0 and '""' not in sentence
            and sum(c.isalpha() or c == " " for c in sentence) >= 0.85 * len(sentence))


@cache
def prose_sentences() -> tuple[str, ...]:
    """The manual's plain sentences in topic order, each once (first occurrence kept)."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for name in sorted(topics):
        for paragraph in _prose_paragraphs(topics[name]):
            # *emphasis* and **strong** markers go; a sentence with another asterisk is dropped.
            paragraph = _EMPHASIS.sub(r"\1", re.sub(r"\s+", " ", paragraph))
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = sentence.strip()
                if _is_plain_sentence(sentence):
                    seen.setdefault(sentence, None)
    return tuple(seen)


@cache
def prose_words(min_length: int = 4, max_length: int = 10) -> tuple[str, ...]:
    """Distinct lowercase alphabetic words of the prose, sorted."""
    words = {word for sentence in prose_sentences() for word in re.findall(r"[A-Za-z]+", sentence)
             if word.islower() and min_length <= len(word) <= max_length}
    return tuple(sorted(words))


def code_file(name: str) -> str:
    """The text of a standard-library module file of the running interpreter."""
    if name not in CODE_FILES:
        raise ValueError(f"code file {name!r}: not one of the held-out files {CODE_FILES}")
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
