"""A RULER-style long-context suite generated offline from local text, for any tokenizer.

Each task is a function `(rng, tokenizer, target_tokens, ...) -> fields` that returns a prompt's
`family`, `context` (everything evictable), `question` (appended after it, RULER's answer prefix
included: the model completes it), `answers`, `metric`, `max_new_tokens` and `depth`.
`make_record` seeds one `numpy.random.Generator` per (seed, task, length, index), so a record
never changes when other tasks, lengths or more prompts are added, and checks that the prompt
has the target length within 2% (in tokens of the given tokenizer, BOS included).

    from transformers import AutoTokenizer
    from kvevict.evaluation.ruler import make_record
    record = make_record("niah_single_number_noise", AutoTokenizer.from_pretrained("models/demo-py"),
                         length=1024, index=0, seed=0)

Tasks (RULER's templates and definitions; `noise`: "The grass is green. ..." repeated on lines,
`prose`: sentences of the Python reference manual, our stand-in for RULER's essays):

* `niah_single_{number,uuid}_{noise,prose}`: one needle "One of the special magic numbers for
  {key} is: {value}." at a depth spread evenly over the prompts (RULER's 40 depths);
* `niah_multikey_1` (prose, 3 needles of other keys besides the asked one), `niah_multikey_2`
  (a haystack made only of needles of other keys), `niah_multivalue` (4 values of one key, all
  asked), `niah_multiquery` (4 keys asked at once);
* `variable_tracking`: chains `VAR ABCDE = 12345`, `VAR FGHIJ = VAR ABCDE`, ... in noise, after
  a worked example; the answer is every name of the asked chain;
* `common_words` (CWE): a numbered list where 10 words repeat more often than the rest, after a
  worked example; `frequent_words` (FWE): coded words with Zipf frequencies, the 3 most frequent;
* `code_recall`: a held-out standard-library file with `MAGIC_NUMBER_<k> = <value>` inserted as a
  statement at a depth, completed by `assert MAGIC_NUMBER_<k> ==`;
* `text_bpb`: prose to score by bits per byte (no question; the runner teacher-forces it).

Deviations from RULER, each for a reason: the length counts the prompt only (the contract of
the prompt file), not the generated tokens; a haystack is cut at a sentence (noise) or a word
(prose) so every prompt is within 2% of its length; the variable-tracking answer prefix has no
trailing space (a completion model writes the space itself) and the text has two chains, so
the asked one must be told from another; CWE uses RULER's short-context repeats (6x / 1x, below
4096 tokens) where 30x / 3x would not fit.
"""

from __future__ import annotations

import ast
import re
import string
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial

import numpy as np

from kvevict.evaluation.ruler_fit import (check_length, fit_units, insert_at_depths, random_depths, spread_depth,
                                          token_counter)
from kvevict.evaluation.ruler_haystacks import NOISE_JOINER, PROSE_JOINER, noise_segments, prose_segments
from kvevict.evaluation.ruler_sources import (CODE_FILES, KEY_ADJECTIVES, KEY_NOUNS, NOISE_SENTENCES, code_file,
                                              prose_sentences, prose_words)

Fields = dict[str, object]
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_ANSWER_TOKENS = {"numbers": 12, "uuids": 40}  # generation budget per asked value


# -- shared pieces -----------------------------------------------------------------------------
def _fit(tokenizer, target_tokens: int, build: Callable[[int], tuple[str, str]],
         limit: int | None = None, first: int = 16) -> tuple[int, str, str]:
    """The largest haystack size whose `context + question` fits the target, and its prompt."""
    count = token_counter(tokenizer)
    n, (context, question), _ = fit_units(build, lambda prompt: count(prompt[0] + prompt[1]), target_tokens,
                                          limit, first)
    return n, context, question


def draw_keys(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct "adjective-noun" keys."""
    space = len(KEY_ADJECTIVES) * len(KEY_NOUNS)
    if count > space:
        raise ValueError(f"{count} distinct keys asked, only {space} exist")
    return [f"{KEY_ADJECTIVES[i // len(KEY_NOUNS)]}-{KEY_NOUNS[i % len(KEY_NOUNS)]}"
            for i in rng.choice(space, size=count, replace=False)]


def draw_values(rng: np.random.Generator, kind: str, count: int) -> list[str]:
    """`count` distinct needle values: 7-digit numbers or uuid4 strings (RULER's)."""
    if kind == "numbers":
        return [str(v) for v in rng.choice(9_000_000, size=count, replace=False) + 1_000_000]
    if kind == "uuids":
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(count)]
    raise ValueError(f"kind: {kind!r} is not 'numbers' or 'uuids'")


# -- needle in a haystack ------------------------------------------------------------------------
def niah(rng: np.random.Generator, tokenizer, target_tokens: int, *, haystack: str, kind: str = "numbers",
         keys: int = 1, values: int = 1, queries: int = 1, depth: float | None = None) -> Fields:
    """Needles "One of the special magic {kind} for {key} is: {value}." in a haystack
    (`noise`, `prose` or `needles`: only needles of other keys); `keys` needles' keys, `values`
    values per key, `queries` keys asked. With `depth`, the asked needle sits at that depth and
    the others at random RULER depths; without, all at random depths."""
    if haystack not in ("noise", "prose", "needles"):
        raise ValueError(f"haystack: {haystack!r} is not 'noise', 'prose' or 'needles'")
    keys = max(keys, queries)
    singular = queries * values == 1
    if depth is not None and not singular:
        raise ValueError("depth: only a task that asks one value places its needle at a depth")
    # Enough haystack needles for any prompt of this length (each has more than 10 tokens).
    pool = target_tokens // 10 + 8 if haystack == "needles" else 0
    names = draw_keys(rng, keys + pool)
    drawn = draw_values(rng, kind, keys * values + pool)
    needles = [NEEDLE.format(kind=kind, key=names[i // values], value=drawn[i]) for i in range(keys * values)]
    # The keys are random, so asking the first ones is asking random ones.
    answers = drawn[:queries * values]
    needle_depths = ([depth] + random_depths(rng, len(needles) - 1, exclude=depth) if depth is not None
                     else random_depths(rng, len(needles)))
    placed = list(zip(needle_depths, needles))
    others = [NEEDLE.format(kind=kind, key=key, value=value) for key, value in zip(names[keys:], drawn[keys * values:])]

    noun = kind[:-1] if singular else kind
    query = names[0] if queries == 1 else ", ".join(names[:queries - 1]) + ", and " + names[queries - 1]
    if singular:
        head = (f"A special magic {noun} is hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n")
        question = (f"\nWhat is the special magic {noun} for {query} mentioned in the provided text? "
                    f"The special magic {noun} for {query} mentioned in the provided text is")
    else:
        head = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n")
        question = (f"\nWhat are all the special magic {noun} for {query} mentioned in the provided text? "
                    f"The special magic {noun} for {query} mentioned in the provided text are")

    if haystack == "noise":
        def build(n: int) -> tuple[str, str]:
            return head + NOISE_JOINER.join(insert_at_depths(noise_segments(n), placed, NOISE_JOINER)), question
        _, context, question = _fit(tokenizer, target_tokens, build)
    elif haystack == "prose":
        start = int(rng.integers(len(prose_sentences())))

        def build(n: int) -> tuple[str, str]:
            return head + PROSE_JOINER.join(insert_at_depths(prose_segments(start, n), placed, PROSE_JOINER)), question
        _, context, question = _fit(tokenizer, target_tokens, build)
    else:
        # Whole needles first; a first line of noise sentences makes up the last tokens, since
        # one needle can be 2% of a short prompt.
        def build_needles(n: int, filler: int = 0) -> tuple[str, str]:
            segments = noise_segments(filler) + others[:n]
            return head + NOISE_JOINER.join(insert_at_depths(segments, placed, NOISE_JOINER)), question
        n, _, _ = _fit(tokenizer, target_tokens, build_needles, limit=len(others))
        _, context, question = _fit(tokenizer, target_tokens, partial(build_needles, n),
                                    limit=5 * len(NOISE_SENTENCES))
    return {"family": "niah", "context": context, "question": question, "answers": answers, "metric": "all",
            "max_new_tokens": _ANSWER_TOKENS[kind] * len(answers) + 4, "depth": depth}


# -- variable tracking ---------------------------------------------------------------------------
def _variable_names(rng: np.random.Generator, count: int, letters: int) -> list[str]:
    names: dict[str, None] = {}
    while len(names) < count:
        for row in rng.integers(0, 26, size=(count, letters)):
            names.setdefault("".join(string.ascii_uppercase[i] for i in row), None)
    return list(names)[:count]


def _chains(names: list[str], chain_values: list[int], hops: int) -> list[list[str]]:
    """`VAR A = value`, `VAR B = VAR A`, ... per chain (hops + 1 names each)."""
    chains = []
    for c, value in enumerate(chain_values):
        chain_names = names[c * (hops + 1):(c + 1) * (hops + 1)]
        chains.append([f"VAR {chain_names[0]} = {value}"] +
                      [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]}" for j in range(hops)])
    return chains


def _chain_depths(rng: np.random.Generator, chains: list[list[str]]) -> list[tuple[float, str]]:
    """Each chain's statements at sorted random depths, so every chain reads in order."""
    return [(float(d), statement) for chain in chains
            for d, statement in zip(np.sort(rng.random(len(chain))), chain)]


def variable_tracking(rng: np.random.Generator, tokenizer, target_tokens: int, *, chains: int = 2,
                      hops: int = 4) -> Fields:
    """RULER's variable tracking in noise: `chains` chains of `hops` assignments, the first asked."""
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"

    def ask(value: int) -> str:
        return (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                f"variables are assigned the value {value}, they are:")

    # Distinct values; 12345 belongs to the worked example's asked chain.
    drawn = [int(v) for v in rng.choice(np.setdiff1d(np.arange(10000, 100000), [12345]), 2 * chains - 1,
                                        replace=False)]
    # A worked example first (RULER's in-context example: 3-letter names, the value 12345).
    example_names = _variable_names(rng, chains * (hops + 1), 3)
    example_values = [12345] + drawn[:chains - 1]
    example_body = NOISE_JOINER.join(insert_at_depths(
        noise_segments(5 * 4), _chain_depths(rng, _chains(example_names, example_values, hops)), NOISE_JOINER))
    example = intro + example_body + ask(12345) + " " + " ".join(example_names[:hops + 1]) + "\n"

    names = _variable_names(rng, chains * (hops + 1), 5)
    values = drawn[chains - 1:]
    placed = _chain_depths(rng, _chains(names, values, hops))
    question = ask(values[0])

    def build(n: int) -> tuple[str, str]:
        return example + intro + NOISE_JOINER.join(insert_at_depths(noise_segments(n), placed, NOISE_JOINER)), question
    _, context, question = _fit(tokenizer, target_tokens, build)
    return {"family": "variable_tracking", "context": context, "question": question, "answers": names[:hops + 1],
            "metric": "all", "max_new_tokens": 30, "depth": None}


# -- word extraction -------------------------------------------------------------------------------
def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


@cache
def _match_safe_words(template: str) -> tuple[str, ...]:
    """Prose words that no other of them contains and the template does not contain, so a
    substring match of one of them means that word."""
    words = prose_words()
    return tuple(w for w in words if w not in template and not any(w != other and w in other for other in words))


def common_words(rng: np.random.Generator, tokenizer, target_tokens: int, *, common: int = 10) -> Fields:
    """RULER's CWE: a numbered list of words where `common` words repeat more often than the rest,
    after a worked example; the answer is the common words."""
    # RULER's repeats (common, uncommon) and example sizes; the long-context ones need >= 4096 tokens.
    if target_tokens >= 4096:
        repeats, example_words, example_repeats = (30, 3), 40, (10, 3)
    else:
        repeats, example_words, example_repeats = (6, 1), 20, (3, 1)
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    ask = (f"\nQuestion: What are the {common} most common words in the above list? "
           f"Answer: The top {common} words that appear most often in the list are:")
    pool = _match_safe_words((intro + ask).lower())
    order = [pool[i] for i in rng.permutation(len(pool))]
    example_seed, list_seed = (int(s) for s in rng.integers(0, 2**63, size=2))

    def word_list(words: list[str], repeat: tuple[int, int], seed: int) -> str:
        entries = words[:common] * repeat[0] + words[common:] * repeat[1]
        return _numbered([entries[i] for i in np.random.default_rng(seed).permutation(len(entries))])

    example_pool = order[:example_words]
    example = (intro + word_list(example_pool, example_repeats, example_seed) + ask + " "
               + _numbered(example_pool[:common]) + "\n")
    words = order[example_words:]

    def build(n: int) -> tuple[str, str]:
        return example + intro + word_list(words[:common + n], repeats, list_seed), ask
    _, context, question = _fit(tokenizer, target_tokens, build, limit=len(words) - common)
    return {"family": "word_extraction", "context": context, "question": question, "answers": words[:common],
            "metric": "all", "max_new_tokens": 64, "depth": None}


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1: a partial sum and its Euler-Maclaurin tail."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k ** -alpha) + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms ** -alpha)


def frequent_words(rng: np.random.Generator, tokenizer, target_tokens: int, *, alpha: float = 2.0,
                   vocab_size: int = 2000, word_length: int = 6) -> Fields:
    """RULER's FWE: coded words with Zipf(alpha) frequencies (the most frequent one is '...',
    noise); the answer is the next three."""
    if alpha <= 1:
        raise ValueError(f"alpha: {alpha} must be > 1 (a Zipf distribution)")
    coded = sorted(name.lower() for name in _variable_names(rng, vocab_size, word_length))
    vocab = [coded[i] for i in rng.permutation(vocab_size)]
    vocab[0] = "..."  # the most frequent word is noise (RULER's)
    shuffle_seed = int(rng.integers(0, 2**63))
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / _zeta(alpha)
    intro = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")
    question = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text? Answer: According to the coded text "
                "above, the three most frequently appeared words are:")

    def build(n: int, dots: int = 0) -> tuple[str, str]:
        counts = np.floor(n * weights).astype(np.int64)
        counts[0] += dots
        words = np.repeat(np.asarray(vocab, dtype=object), counts)
        return intro + " ".join(words[np.random.default_rng(shuffle_seed).permutation(len(words))]), question
    # One more word of text can add several new words at once; extra dots (noise, already the
    # most frequent word) make up the last tokens.
    n, _, _ = _fit(tokenizer, target_tokens, build, first=256)
    _, context, question = _fit(tokenizer, target_tokens, partial(build, n), limit=64)
    counts = np.floor(n * weights).astype(np.int64)
    if not counts[3] > counts[4]:
        raise ValueError(f"frequent_words: {target_tokens} tokens are too few to rank the three most frequent words")
    return {"family": "word_extraction", "context": context, "question": question, "answers": vocab[1:4],
            "metric": "all", "max_new_tokens": 32, "depth": None}


# -- code ------------------------------------------------------------------------------------------
def statement_starts(source: str) -> list[tuple[int, int]]:
    """(line index, indentation) of the lines before which a statement can be inserted, with that
    indentation, keeping the file valid Python: every statement that begins its own line
    (decorators first), and the blank and comment lines right before one (with its indentation)."""
    lines = source.splitlines()
    starts: dict[int, int] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.stmt):
            continue
        line = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        text = lines[line]
        # `elif` is an If node; one-liners and `a; b` share a line with another statement.
        if len(text) - len(text.lstrip()) == node.col_offset and not text.lstrip().startswith("elif"):
            starts[line] = node.col_offset  # a decorator's `@` is in the same column as its `def`
    # Blank and comment lines before a statement (never inside a string or brackets: the next
    # code line there is not a statement start).
    following = None
    for line in range(len(lines) - 1, -1, -1):
        stripped = lines[line].strip()
        if line in starts:
            following = starts[line]
        elif not stripped or stripped.startswith("#"):
            if following is not None:
                starts[line] = following
        else:
            following = None
    return sorted(starts.items())


def code_recall(rng: np.random.Generator, tokenizer, target_tokens: int, *, depth: float,
                tolerance: float = 0.05) -> Fields:
    """A held-out standard-library file (the start of it that fits) with `MAGIC_NUMBER_<k> =
    <value>` inserted as a statement at `depth`; the question `assert MAGIC_NUMBER_<k> ==`.

    Statements can go only between statements, and a long docstring can span a good part of a
    short prompt, so the files are tried in a random order until one takes the constant within
    `tolerance` of the depth (the closest one otherwise)."""
    count = token_counter(tokenizer)
    sources = {name: code_file(name) for name in CODE_FILES}
    usable = [name for name in CODE_FILES if count(sources[name]) > target_tokens]
    if not usable:
        raise ValueError(f"no held-out file {CODE_FILES} has more than {target_tokens} tokens")
    number, value = int(rng.integers(1, 100)), int(rng.integers(1_000_000, 10_000_000))
    constant = f"MAGIC_NUMBER_{number} = {value}\n"
    question = f"\nassert MAGIC_NUMBER_{number} =="
    best = None
    for name in (usable[i] for i in rng.permutation(len(usable))):
        source = sources[name]
        line_starts = np.concatenate([[0], np.cumsum([len(line) for line in source.splitlines(keepends=True)])])
        starts = [(int(line_starts[line]), indent) for line, indent in statement_starts(source)]
        # The context is cut after a word (a line of code can be 2% of a short prompt), so its
        # last line may be cut short, as in any window of a file.
        cuts = [match.end() for match in re.finditer(r"\S+", source)]

        def build(n: int) -> tuple[str, str]:
            cut = cuts[n - 1] if n else 0
            inside = [(start, indent) for start, indent in starts if start < cut] or [(0, 0)]
            start, indent = min(inside, key=lambda s: (abs(s[0] - depth * cut), s[0]))
            return source[:start] + " " * indent + constant + source[start:cut], question
        _, context, _ = _fit(tokenizer, target_tokens, build, limit=len(cuts))
        error = abs(context.index(constant) / max(len(context) - len(constant), 1) - depth)
        if best is None or error < best[0]:
            best = (error, context)
        if error <= tolerance:
            break
    return {"family": "code_recall", "context": best[1], "question": question, "answers": [str(value)],
            "metric": "all", "max_new_tokens": 16, "depth": depth}


# -- text ------------------------------------------------------------------------------------------
def text_bpb(rng: np.random.Generator, tokenizer, target_tokens: int) -> Fields:
    """Running prose from a random sentence, scored by bits per byte (no question)."""
    start = int(rng.integers(len(prose_sentences())))
    _, context, _ = _fit(tokenizer, target_tokens, lambda n: (PROSE_JOINER.join(prose_segments(start, n)), ""))
    return {"family": "text", "context": context, "question": "", "answers": [], "metric": "bpb",
            "max_new_tokens": 0, "depth": None}


# -- the suite -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteTask:
    """A task of the suite: its record builder and whether its prompts spread a needle's depth."""

    name: str
    build: Callable[..., Fields]
    spread_depth: bool = False


TASKS: dict[str, SuiteTask] = {task.name: task for task in (
    SuiteTask("niah_single_number_noise", partial(niah, haystack="noise", kind="numbers"), True),
    SuiteTask("niah_single_number_prose", partial(niah, haystack="prose", kind="numbers"), True),
    SuiteTask("niah_single_uuid_noise", partial(niah, haystack="noise", kind="uuids"), True),
    SuiteTask("niah_single_uuid_prose", partial(niah, haystack="prose", kind="uuids"), True),
    SuiteTask("niah_multikey_1", partial(niah, haystack="prose", keys=4), True),
    SuiteTask("niah_multikey_2", partial(niah, haystack="needles"), True),
    SuiteTask("niah_multivalue", partial(niah, haystack="prose", values=4)),
    SuiteTask("niah_multiquery", partial(niah, haystack="prose", keys=4, queries=4)),
    SuiteTask("variable_tracking", variable_tracking),
    SuiteTask("common_words", common_words),
    SuiteTask("frequent_words", frequent_words),
    SuiteTask("code_recall", code_recall, True),
    SuiteTask("text_bpb", text_bpb),
)}


def record_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
    """The one generator of a record: seeded by (seed, task, length, index) alone."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def make_record(task: str, tokenizer, length: int, index: int, seed: int = 0) -> dict[str, object]:
    """One prompt record of the prompt-file format (`kvevict.evaluation.ruler_records`)."""
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not one of {sorted(TASKS)}")
    if length < 1 or index < 0 or seed < 0:
        raise ValueError(f"length ({length}) must be >= 1, index ({index}) and seed ({seed}) >= 0")
    spec = TASKS[task]
    depth = {"depth": spread_depth(index)} if spec.spread_depth else {}
    try:
        fields = spec.build(record_rng(seed, task, length, index), tokenizer, length, **depth)
        check_length(token_counter(tokenizer)(fields["context"] + fields["question"]), length, "the prompt")
    except ValueError as error:
        raise ValueError(f"{task} at {length} tokens: {error}") from error
    return {"id": f"{task}/{length}/{index:04d}", "task": task, "family": fields["family"], "length": length,
            "seed": seed, "context": fields["context"], "question": fields["question"],
            "answers": fields["answers"], "metric": fields["metric"], "max_new_tokens": fields["max_new_tokens"],
            "depth": fields["depth"]}


def make_records(tokenizer, tasks: Sequence[str], lengths: Sequence[int], n: int, seeds: Sequence[int],
                 in_rounds: bool = False) -> list[dict[str, object]]:
    """`n` records per task, length and seed; a seed's indices run on from the previous seed's
    (seed k of the list gets k*n .. k*n+n-1), so ids stay unique. Task by task, or `in_rounds`:
    one record per task, length and seed, then the next, so a run cut short covers them alike."""
    keys = [(task, length, draw, index) for task in tasks for length in lengths
            for draw in range(len(seeds)) for index in range(n)]
    if in_rounds:
        keys.sort(key=lambda key: (key[3], key[2]))  # stable: task and length order within a round
    return [make_record(task, tokenizer, length, draw * n + index, seeds[draw]) for task, length, draw, index in keys]
