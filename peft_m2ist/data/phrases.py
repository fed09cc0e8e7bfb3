"""Referring expressions for shape scenes: what a phrase means, and how one is made.

A phrase is first built as a small structured *query* and only then written out as words.
``resolve`` is the meaning of a query: for each object of a scene it answers True (the query
names it), False (it clearly does not) or None (too close to call, e.g. two objects nearly level
for "leftmost"). ``generate_phrase`` only keeps a query when ``resolve`` answers True for the
target and False for every other object, so each phrase names exactly one object.

Phrase types: ``attribute`` ("the small green triangle", as few attributes as make it unique),
``relation`` ("the circle left of the red square"), ``position`` ("the top-most star",
"the square on the left") and ``ordinal`` ("the second square from the left").
Spatial words use box centres in image coordinates (y grows downwards) with a margin: a centre
within ``margin`` pixels of the other counts as too close to call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peft_m2ist.data.shapes import SceneObject

PHRASE_TYPES: tuple[str, ...] = ("attribute", "relation", "position", "ordinal")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

NOUNS: dict[str | None, tuple[str, ...]] = {
    None: ("shape", "object", "thing"),
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "top": ("above", "over"),
    "bottom": ("below", "under", "beneath"),
}
EXTREME_TEMPLATES: dict[str, tuple[str, ...]] = {
    "left": ("the leftmost {d}", "the left-most {d}", "the {d} furthest to the left", "the {d} on the far left"),
    "right": ("the rightmost {d}", "the right-most {d}", "the {d} furthest to the right", "the {d} on the far right"),
    "top": ("the topmost {d}", "the top-most {d}", "the highest {d}", "the {d} at the top"),
    "bottom": ("the bottom-most {d}", "the lowest {d}", "the {d} at the bottom"),
}
PAIR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "left": ("the {d} on the left", "the left {d}"),
    "right": ("the {d} on the right", "the right {d}"),
    "top": ("the upper {d}", "the top {d}"),
    "bottom": ("the lower {d}", "the bottom {d}"),
}
ORDINALS: dict[int, str] = {2: "second", 3: "third"}
FROM_WORDS: dict[str, str] = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}


@dataclass(frozen=True)
class Description:
    """A noun phrase over intrinsic attributes; ``None`` leaves an attribute unsaid."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` has every attribute this description states."""
        return all(
            want is None or want == have
            for want, have in ((self.size, obj.size), (self.colour, obj.colour), (self.shape, obj.shape))
        )

    def num_attributes(self) -> int:
        """How many attributes are stated."""
        return sum(a is not None for a in (self.size, self.colour, self.shape))


@dataclass(frozen=True)
class Query:
    """A structured referring expression.

    ``kind`` is one of ``PHRASE_TYPES``. ``direction`` (one of ``DIRECTIONS``) is used by the
    spatial kinds; ``anchor`` by ``relation``; ``rank`` (1-based) by ``ordinal``.
    """

    kind: str
    description: Description
    direction: str | None = None
    anchor: Description | None = None
    rank: int | None = None


def _coordinate(obj: SceneObject, direction: str) -> float:
    """Centre coordinate that grows towards ``direction``'s far end being *first* (smaller = first)."""
    cx, cy = obj.centre
    return {"left": cx, "right": -cx, "top": cy, "bottom": -cy}[direction]


def _rank_of(index: int, candidates: Sequence[int], objects: Sequence[SceneObject], direction: str,
             rank: int, margin: float) -> bool | None:
    """Whether ``objects[index]`` is surely (True), surely not (False) or maybe the ``rank``-th."""
    mine = _coordinate(objects[index], direction)
    others = [_coordinate(objects[j], direction) for j in candidates if j != index]
    surely_before = sum(c < mine - margin for c in others)
    maybe_before = sum(c < mine + margin for c in others)
    if surely_before == maybe_before == rank - 1:
        return True
    if surely_before <= rank - 1 <= maybe_before:
        return None
    return False


def _relation(obj: SceneObject, anchor: SceneObject, direction: str, margin: float) -> bool | None:
    """Whether ``obj`` lies towards ``direction`` of ``anchor`` (True/False, None if too close)."""
    delta = _coordinate(anchor, direction) - _coordinate(obj, direction)
    if delta > margin:
        return True
    if delta < -margin:
        return False
    return None


def resolve(query: Query, objects: Sequence[SceneObject], margin: float) -> list[bool | None]:
    """The meaning of ``query`` on a scene: one True/False/None per object (see module docstring)."""
    candidates = [i for i, o in enumerate(objects) if query.description.matches(o)]
    answers: list[bool | None] = [False] * len(objects)
    if query.kind == "attribute":
        for i in candidates:
            answers[i] = True
        return answers
    if query.direction is None:
        raise ValueError(f"a {query.kind} query needs a direction")
    if query.kind == "relation":
        if query.anchor is None:
            raise ValueError("a relation query needs an anchor")
        anchors = [i for i, o in enumerate(objects) if query.anchor.matches(o)]
        if len(anchors) != 1:
            # The anchor itself is ambiguous or absent: the phrase names nothing for sure.
            return [None if i in candidates else False for i in range(len(objects))]
        (a,) = anchors
        for i in candidates:
            if i != a:
                answers[i] = _relation(objects[i], objects[a], query.direction, margin)
        return answers
    rank = 1 if query.kind == "position" else query.rank
    if rank is None:
        raise ValueError("an ordinal query needs a rank")
    for i in candidates:
        answers[i] = _rank_of(i, candidates, objects, query.direction, rank, margin)
    return answers


def names_only(query: Query, objects: Sequence[SceneObject], target: int, margin: float) -> bool:
    """True iff ``query`` surely names ``objects[target]`` and surely names no other object."""
    answers = resolve(query, objects, margin)
    return all(answer is (i == target) for i, answer in enumerate(answers))


def _descriptions(obj: SceneObject) -> list[Description]:
    """Every description ``obj`` satisfies, fewest attributes first (ties in a fixed order)."""
    fields = (("size", obj.size), ("colour", obj.colour), ("shape", obj.shape))
    out = []
    for k in range(4):
        for subset in itertools.combinations(fields, k):
            out.append(Description(**dict(subset)))
    return out


def minimal_description(
    objects: Sequence[SceneObject], target: int, rng: np.random.Generator
) -> Description | None:
    """A description with as few attributes as make ``objects[target]`` unique (random among ties)."""
    unique = [
        d for d in _descriptions(objects[target])
        if sum(d.matches(o) for o in objects) == 1
    ]
    if not unique:
        return None
    fewest = min(d.num_attributes() for d in unique)
    tied = [d for d in unique if d.num_attributes() == fewest]
    return tied[int(rng.integers(len(tied)))]


def _ambiguous_descriptions(objects: Sequence[SceneObject], target: int, at_least: int) -> list[Description]:
    """Descriptions of the target that match at least ``at_least`` objects (so space must decide)."""
    return [
        d for d in _descriptions(objects[target])
        if sum(d.matches(o) for o in objects) >= at_least
    ]


def _shuffled(items: Sequence, rng: np.random.Generator) -> list:
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def build_query(
    kind: str,
    objects: Sequence[SceneObject],
    target: int,
    rng: np.random.Generator,
    margin: float,
    allowed_anchors: Sequence[int] | None = None,
) -> Query | None:
    """A query of ``kind`` that names exactly ``objects[target]``, or ``None`` if none exists.

    ``allowed_anchors`` restricts which objects a relation may be anchored on (default: any).
    """
    if kind == "attribute":
        description = minimal_description(objects, target, rng)
        return None if description is None else Query("attribute", description)
    if kind == "relation":
        anchors = [i for i in (allowed_anchors if allowed_anchors is not None else range(len(objects)))
                   if i != target]
        anchor_descriptions = {a: minimal_description(objects, a, rng) for a in anchors}
        for description in _shuffled(_ambiguous_descriptions(objects, target, 2), rng):
            for a in _shuffled(anchors, rng):
                anchor = anchor_descriptions[a]
                if anchor is None:
                    continue
                for direction in _shuffled(DIRECTIONS, rng):
                    query = Query("relation", description, direction=direction, anchor=anchor)
                    if names_only(query, objects, target, margin):
                        return query
        return None
    if kind in ("position", "ordinal"):
        at_least = 2 if kind == "position" else 3
        ranks = [1] if kind == "position" else list(ORDINALS)
        for description in _shuffled(_ambiguous_descriptions(objects, target, at_least), rng):
            for direction in _shuffled(DIRECTIONS, rng):
                for rank in ranks:
                    query = Query(kind, description, direction=direction, rank=None if kind == "position" else rank)
                    if names_only(query, objects, target, margin):
                        return query
        return None
    raise ValueError(f"unknown phrase type {kind!r}; known: {PHRASE_TYPES}")


def _choice(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def describe(description: Description, rng: np.random.Generator) -> str:
    """Words for a description without the article, e.g. ``"small green ball"``."""
    words = []
    if description.size is not None:
        words.append(_choice(SIZE_WORDS[description.size], rng))
    if description.colour is not None:
        words.append(description.colour)
    words.append(_choice(NOUNS[description.shape], rng))
    return " ".join(words)


def realise(query: Query, objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    """Write ``query`` as an English phrase, picking synonyms and templates at random."""
    noun_phrase = describe(query.description, rng)
    if query.kind == "attribute":
        return f"the {noun_phrase}"
    assert query.direction is not None
    if query.kind == "relation":
        assert query.anchor is not None
        relation = _choice(RELATION_WORDS[query.direction], rng)
        return f"the {noun_phrase} {relation} the {describe(query.anchor, rng)}"
    if query.kind == "position":
        num_candidates = sum(query.description.matches(o) for o in objects)
        templates = PAIR_TEMPLATES if num_candidates == 2 else EXTREME_TEMPLATES
        return _choice(templates[query.direction], rng).format(d=noun_phrase)
    assert query.rank is not None
    return f"the {ORDINALS[query.rank]} {noun_phrase} from the {FROM_WORDS[query.direction]}"
