"""Constrained decoding of CropVLM's box grammar: the cropper can only write valid boxes.

The grammar is the canonical multi-box text of :func:`~zoomvlm.core.geometry.format_percent_boxes`::

    boxes  := " "? box (", " box){0,K-1} "."
    box    := "[" x1 ", " y1 ", " x2 ", " y2 "]"
    number := "0" | [1-9][0-9]? | "100"          (integer percentages, no leading zeros)

with CropVLM's validity rule enforced while the numbers are written: ``x1, y1`` in ``0..99`` (so a larger
``x2``/``y2`` exists), ``x2`` in ``x1+1..100`` and ``y2`` in ``y1+1..100``. Every text the automaton accepts
is parsed by :func:`~zoomvlm.core.geometry.parse_percent_boxes` into ``<= K`` boxes (a property test checks it
on the tiny and the real SmolVLM tokenizers); the parser stays the one place that turns text into Boxes.

:class:`BoxLogitsProcessor` is a transformers ``LogitsProcessor``: at each step it keeps only the tokens whose
text keeps the completion a prefix of a valid box text, and end-of-sequence only after the final ``"."``.
It works on any tokenizer, whatever digits, numbers and punctuation it merges into one token, because it walks
each candidate token's text character by character through the automaton.

Why our own small processor rather than a constrained-generation library (``outlines``, ``transformers-cfg``,
``lm-format-enforcer``): they take a regular expression or a context-free grammar, and ``x2 > x1`` is a
constraint between two numbers that neither expresses compactly (a regex would have to enumerate the ~5,000
valid ``(x1, x2)`` pairs per axis, with ``y1`` written in between); a new dependency for a four-phase automaton
was not worth it. (Not installed or tried here.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from transformers import LogitsProcessor

__all__ = ["BoxGrammar", "BoxLogitsProcessor", "BoxVocabulary", "GrammarState"]

_IN_BOX, _AFTER_BOX, _DONE, _START = 0, 1, 2, 3
_ALPHABET = frozenset("[]0123456789,. ")


class GrammarState(NamedTuple):
    """Where the automaton is: ``boxes`` finished, ``values`` of the current box, ``digits`` of the number
    being written, ``pending`` literal characters that must come next, ``phase`` (in a box / after a box /
    done)."""

    boxes: int
    values: tuple[int, ...]
    digits: str
    pending: str
    phase: int


@functools.cache
def _extends(digits: str, lo: int, hi: int) -> bool:
    """Is ``digits`` a prefix of the decimal text of some integer in ``[lo, hi]`` (no leading zeros)?"""
    return any(str(v).startswith(digits) for v in range(lo, hi + 1))


class BoxGrammar:
    """The character automaton of the box grammar (module docstring) with at most ``max_boxes`` boxes.

    ``step(state, ch)`` returns the next state or ``None`` when ``ch`` cannot continue any valid box text;
    ``is_final(state)`` says the text so far is a complete, valid box text (only then may generation end).

    Raises:
        ValueError: ``max_boxes`` < 1.
    """

    def __init__(self, max_boxes: int = 1):
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        self.max_boxes = max_boxes
        # SmolVLM's template ends the generation prompt with "Assistant:" and its SFT answers start with a space
        # (``answer_text``), so one optional leading space is part of the grammar.
        self.start = GrammarState(0, (), "", "", _START)

    @staticmethod
    def bounds(values: tuple[int, ...]) -> tuple[int, int]:
        """Allowed ``[lo, hi]`` of the next number of a box, given the box's numbers so far (percent)."""
        i = len(values)
        if i < 2:  # x1, y1: leave room for x2 > x1, y2 > y1
            return 0, 99
        return values[i - 2] + 1, 100

    def step(self, state: GrammarState, ch: str) -> GrammarState | None:
        """The state after reading one character, or ``None`` if no valid box text continues this way."""
        boxes, values, digits, pending, phase = state
        if pending:
            return state._replace(pending=pending[1:]) if ch == pending[0] else None
        if phase == _START:
            opened = GrammarState(0, (), "", "[", _IN_BOX)
            return opened if ch == " " else self.step(opened, ch)
        if phase == _IN_BOX:
            lo, hi = self.bounds(values)
            if ch.isdigit() and ch.isascii():
                return state._replace(digits=digits + ch) if _extends(digits + ch, lo, hi) else None
            if ch in ",]" and digits and lo <= int(digits) <= hi:
                values = (*values, int(digits))
                if ch == "," and len(values) < 4:
                    return GrammarState(boxes, values, "", " ", _IN_BOX)
                if ch == "]" and len(values) == 4:
                    return GrammarState(boxes + 1, (), "", "", _AFTER_BOX)
            return None
        if phase == _AFTER_BOX:
            if ch == ".":
                return GrammarState(boxes, (), "", "", _DONE)
            if ch == "," and boxes < self.max_boxes:
                return GrammarState(boxes, (), "", " [", _IN_BOX)
        return None

    def feed(self, state: GrammarState | None, text: str) -> GrammarState | None:
        """Read ``text`` from ``state``; ``None`` once any character is rejected."""
        for ch in text:
            if state is None:
                return None
            state = self.step(state, ch)
        return state

    @staticmethod
    def is_final(state: GrammarState | None) -> bool:
        return state is not None and state.phase == _DONE and not state.pending


class BoxVocabulary:
    """A tokenizer's vocabulary seen through the box grammar; built once per (tokenizer, K), then shared by the
    logits processors of every ``generate`` call.

    Args:
        tokenizer: any transformers tokenizer (a processor's ``.tokenizer``).
        eos_token_ids: the ids that end generation (the model's ``generation_config.eos_token_id``).
        max_boxes: K, the most boxes one answer may hold.

    Raises:
        ValueError: the tokenizer cannot spell the grammar (some character of ``"[]0123456789,. "`` has no
            token of its own), or no end-of-sequence id is given.
    """

    def __init__(self, tokenizer, eos_token_ids: int | Iterable[int] | None, max_boxes: int = 1):
        self.grammar = BoxGrammar(max_boxes)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_id
        if eos_token_ids is None:
            raise ValueError("constrained decoding needs an end-of-sequence token id")
        self.eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        # Only tokens spelled entirely in the grammar's alphabet can ever be allowed (a few dozen of 49k for
        # SmolVLM's tokenizer); special tokens decode to "<...>" and drop out here.
        self.texts: dict[int, str] = {}
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            if text and set(text) <= _ALPHABET:
                self.texts[token_id] = text
        missing = _ALPHABET - {t for t in self.texts.values() if len(t) == 1}
        if missing:
            raise ValueError(f"the tokenizer has no single-character token for {sorted(missing)}: cannot constrain")
        self._masks: dict[tuple[GrammarState | None, bool, int], torch.Tensor] = {}

    def allowed(self, state: GrammarState | None, finished: bool = False) -> list[int]:
        """Token ids allowed after ``state``: those that keep a valid prefix, EOS only when the text is final.
        ``finished`` (EOS already emitted) or a broken state allow only EOS, so the row never becomes all
        ``-inf`` (which would make sampling fail on padding steps of a batch)."""
        if finished or state is None:
            return list(self.eos)
        if self.grammar.is_final(state):
            return list(self.eos)
        return [t for t, text in self.texts.items() if self.grammar.feed(state, text) is not None]

    def mask(self, state: GrammarState | None, finished: bool, size: int, device) -> torch.Tensor:
        """Boolean ``[size]`` mask of allowed ids (cached per state; ``size`` = the logits' vocabulary)."""
        key = (state, finished, size)
        if key not in self._masks:
            mask = torch.zeros(size, dtype=torch.bool)
            mask[[t for t in self.allowed(state, finished) if t < size]] = True
            self._masks[key] = mask
        return self._masks[key].to(device)


class BoxLogitsProcessor(LogitsProcessor):
    """Masks every token that would make the completion an invalid box text (see the module docstring).

    Pass a FRESH instance to each ``model.generate`` call (``logits_processor=LogitsProcessorList([...])``):
    the first call sees the prompt, whose length it records; later calls read the generated suffix. States are
    memoised per generated prefix, so batched rows, sampling and beam reordering are all handled.

    Args:
        vocabulary: the :class:`BoxVocabulary` of the model's tokenizer.

    Shapes: ``input_ids`` ``[B, T]`` (prompt + generated so far), ``scores`` ``[B, V]``; returns ``scores``
    with disallowed entries set to ``-inf``.
    """

    def __init__(self, vocabulary: BoxVocabulary):
        self.vocabulary = vocabulary
        self.prompt_length: int | None = None
        self._states: dict[tuple[int, ...], tuple[GrammarState | None, bool]] = {(): (vocabulary.grammar.start, False)}

    def _state(self, generated: Sequence[int]) -> tuple[GrammarState | None, bool]:
        key = tuple(generated)
        if key not in self._states:
            state, finished = self._state(key[:-1])
            token = key[-1]
            if finished or token in self.vocabulary.eos:
                self._states[key] = (state, True)
            else:
                text = self.vocabulary.texts.get(token)
                self._states[key] = (None if text is None else self.vocabulary.grammar.feed(state, text), False)
        return self._states[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids[:, self.prompt_length :].tolist()
        masks = torch.stack(
            [self.vocabulary.mask(*self._state(row), scores.shape[-1], scores.device) for row in generated]
        )
        return scores.masked_fill(~masks, float("-inf"))
