"""A gold judge for the generated story corpus (``datamodules.text_corpus``): a program that reads a story and
counts how it breaks the invariants every generated story keeps, so RL methods can be scored by something other
than the reward model they were trained against.

What it checks (each count is one kind of violation; the score is minus their sum, 0 = clean):

- ``unparsed``: sentences that are none of the generator's sentence templates (garbled or truncated text);
- ``missing``: plot sentences a story always has but this one lacks (the opening, finding the object, the action
  with the friend, the ending);
- ``order``: neighbouring sentences out of narrative order or repeated (what ``shuffle`` breaks);
- ``name``: sentences naming someone other than the protagonist introduced by the prompt (``name``);
- ``pronoun``: sentences whose pronoun is not the protagonist's (``pronoun``);
- ``object``: sentences about another object than the first one found (``object``);
- ``friend``: sentences with another friend than the first one met;
- ``mood``: a feeling and an ending of opposite moods (the generator draws both from the story's one mood).

Why it is independent of the reward model: it has no parameters and was never trained; it is written from the
generator's templates and word lists, never from the preference pairs, and reads only the text. The reward model
learns from pairs what a corruption looks like and can be fooled by text it never saw; the judge cannot be moved
by optimising against the reward model. It only applies to the generated corpus (not to local text files).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from datamodules.text_corpus import (
    ACTIONS,
    ADJECTIVES,
    ENDINGS,
    FEELINGS,
    FRIENDS,
    KINDS,
    NAMES,
    OBJECTS,
    PLACES,
    WHERES,
    split_sentences,
)

CHECKS = ("unparsed", "missing", "order", "name", "pronoun", "object", "friend", "mood")
OPENING, LIVED, FOUND, FELT, ACTED, LIKED, ENDING = range(7)  # the generator's sentence slots, in story order
REQUIRED = (OPENING, FOUND, ACTED, ENDING)  # the slots a generated story never drops
FIELD_GROUPS = {"n": "name", "o": "object", "f": "friend"}


def _any_of(words: list[str]) -> str:
    """A regex alternative of ``words`` (longest first, so no word stops at a shorter one's prefix)."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _capitalised(words: list[str]) -> list[str]:
    return [w[0].upper() + w[1:] for w in words]


_NAME, _OBJECT = _any_of([n for names in NAMES.values() for n in names]), _any_of(OBJECTS)
_FRIEND, _PRONOUN = _any_of(FRIENDS + _capitalised(FRIENDS)), "(?P<pronoun>She|He)"
_FIELDS = {"n": _NAME, "o": _OBJECT, "f": _FRIEND}


def _template(text: str) -> str:
    """The regex of a generator template whose ``{n}``/``{o}``/``{f}`` fields become named groups."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{FIELD_GROUPS[field]}>{_FIELDS[field]})")
    return "".join(parts)


def _patterns() -> list[tuple[int, re.Pattern, str | None]]:
    """``(slot, pattern, mood)`` of every sentence the generator writes (``make_story``'s templates)."""
    out = [
        (OPENING, rf"Once upon a time, there was a {_any_of(ADJECTIVES)} {_any_of(KINDS)} named (?P<name>{_NAME})\.",
         None),
        (LIVED, rf"{_PRONOUN} lived {_any_of(PLACES)}\.", None),
        (FOUND, rf"One day, (?P<name>{_NAME}) found a (?P<object>{_OBJECT}) {_any_of(WHERES)}\.", None),
        (LIKED, rf"(?P<friend>{_FRIEND}) liked the (?P<object>{_OBJECT}) too\.", None),
    ]
    out += [(FELT, rf"{_PRONOUN} was {_any_of(feelings)}\.", mood) for mood, feelings in FEELINGS.items()]
    out += [(ACTED, _template("{n} " + action + "."), None) for action in ACTIONS]
    out += [(ENDING, _template(ending), mood) for mood, endings in ENDINGS.items() for ending in endings]
    return [(slot, re.compile(pattern), mood) for slot, pattern, mood in out]


PATTERNS = _patterns()


@dataclass(frozen=True)
class Sentence:
    """A sentence recognised as one of the generator's templates."""

    slot: int
    entities: dict[str, str]
    mood: str | None


@dataclass(frozen=True)
class Verdict:
    """How many times a story breaks each check (``CHECKS``)."""

    violations: dict[str, int]

    @property
    def score(self) -> float:
        """Minus the number of violations: 0 for a clean story, lower for a worse one."""
        return float(-sum(self.violations.values()))

    @property
    def clean(self) -> bool:
        return not any(self.violations.values())


def parse_sentence(sentence: str) -> Sentence | None:
    """The template slot, entities and mood of a generated sentence (``None``: no template matches)."""
    for slot, pattern, mood in PATTERNS:
        match = pattern.fullmatch(sentence.strip())
        if match:
            entities = {k: v for k, v in match.groupdict().items() if v is not None}
            if "friend" in entities:  # a friend starts a sentence capitalised
                entities["friend"] = entities["friend"][0].lower() + entities["friend"][1:]
            if "pronoun" in entities:
                entities["pronoun"] = entities["pronoun"].lower()
            return Sentence(slot, entities, mood)
    return None


def protagonist(prompt: str) -> tuple[str, str]:
    """The protagonist's name and pronoun, from a prompt that opens a generated story."""
    sentences = split_sentences(prompt)
    opening = parse_sentence(sentences[0]) if sentences else None
    if opening is None or opening.slot != OPENING:
        raise ValueError(f"not the opening of a generated story: {prompt[:80]!r}")
    name = opening.entities["name"]
    return name, next(pronoun for pronoun, names in NAMES.items() if name in names)


def _mismatches(parsed: list[Sentence], key: str, expected: Any = None) -> int:
    """Sentences whose ``key`` differs from ``expected`` (default: its first value in the story)."""
    values = [s.entities[key] for s in parsed if key in s.entities]
    if expected is None and values:
        expected = values[0]
    return sum(v != expected for v in values)


def judge(text: str, prompt: str) -> Verdict:
    """Judge a whole story ``text`` (prompt and completion); ``prompt`` introduces its protagonist."""
    name, pronoun = protagonist(prompt)
    sentences = [parse_sentence(s) for s in split_sentences(text)]
    parsed = [s for s in sentences if s is not None]
    slots = [s.slot for s in parsed]
    moods = [s.mood for s in parsed if s.mood is not None]
    violations = {
        "unparsed": len(sentences) - len(parsed),
        "missing": sum(slot not in slots for slot in REQUIRED),
        "order": sum(b <= a for a, b in zip(slots, slots[1:])),
        "name": _mismatches(parsed, "name", name),
        "pronoun": _mismatches(parsed, "pronoun", pronoun),
        "object": _mismatches(parsed, "object"),
        "friend": _mismatches(parsed, "friend"),
        "mood": sum(m != moods[0] for m in moods),
    }
    return Verdict(violations)


def gold_score(prompt: str, completion: str) -> float:
    """The judge's score of a prompt and a sampled completion (joined as the policy saw them)."""
    return judge(f"{prompt} {completion}", prompt).score
