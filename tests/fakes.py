"""Small stand-ins for a target, for tests of the pipeline and run bookkeeping (no model needed)."""

from __future__ import annotations

import time

from zoomvlm.core.geometry import Budget
from zoomvlm.targets.base import Generation, Usage


class EchoTarget:
    """Answers with the answer it is told about via ``answers_by_question`` ("?" otherwise); counts calls.

    Each request sleeps ``delay`` seconds and reports them as its ``usage.seconds``.
    """

    def __init__(
        self, answers_by_question: dict[str, str] | None = None, delay: float = 0.0, budget: Budget | None = None
    ):
        self.answers = answers_by_question or {}
        self.delay = delay
        self.budget = budget or Budget(max_side=64)
        self.name = "echo"
        self.calls = 0
        self.requests = []

    def generate(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            self.requests.append(r)
            time.sleep(self.delay)
            views = r.views(self.budget)
            usage = Usage(tuple(v.width * v.height for v in views), seconds=self.delay)
            out.append(Generation(self.answers.get(r.question, "?"), usage))
        return out

    def loglikelihood(self, requests):
        self.calls += len(requests)
        return [-float(len(r.answer)) for r in requests]
