"""The optional pairwise judge of `ila evaluate`: two models answer the same held-out prompts, an OpenAI-compatible
model picks the better answer (order randomised, ties allowed), and the win rate carries a binomial error.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ila.errors import IlaError
from ila.sft_data import IGNORE_INDEX, Example, Message

log = logging.getLogger(__name__)


JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistants. Compare two answers to the same user request for "
    "helpfulness, correctness, relevance and harmlessness. Ignore their length and order."
)
_VERDICT = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)


def judge_messages(question: str, first: str, second: str) -> list[Message]:
    """The chat messages asking the judge which answer is better (MT-Bench-style verdict [[A]]/[[B]]/[[C]])."""
    user = (
        f"[User request]\n{question.strip()}\n\n[Answer A]\n{first.strip()}\n\n[Answer B]\n{second.strip()}\n\n"
        "Explain briefly, then give your final verdict on the last line as [[A]] if A is better, [[B]] if B "
        "is better, or [[C]] for a tie."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply (its last [[...]] mark); None when there is none."""
    marks = _VERDICT.findall(reply)
    mark = marks[-1].upper() if marks else reply.strip().strip(".*").upper()
    return {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}.get(mark)


@dataclass
class JudgeResult:
    """Win rate of model A over model B: (wins + ties/2) / judged, with each verdict kept for inspection."""

    wins: int = 0
    losses: int = 0
    ties: int = 0
    unparsed: int = 0
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def judged(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float | None:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else None

    @property
    def win_rate_stderr(self) -> float | None:
        """Binomial standard error sqrt(p(1-p)/n), a tie scoring 1/2: the spread of the per-item scores over sqrt(n).

        Without ties this is exactly sqrt(p(1-p)/n); ties shrink it. None below two judged items.
        """
        rate, n = self.win_rate, self.judged
        if rate is None or n < 2:
            return None
        spread = self.wins * (1 - rate) ** 2 + self.losses * rate**2 + self.ties * (0.5 - rate) ** 2
        return math.sqrt(spread / n / n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "win_rate": self.win_rate,
            "win_rate_stderr": self.win_rate_stderr,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "unparsed": self.unparsed,
            "judged": self.judged,
            "verdicts": self.verdicts,
        }


def pairwise_judge(
    questions: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    ask: Callable[[list[Message]], str],
    seed: int = 0,
) -> JudgeResult:
    """Ask the judge about each pair; the order shown is shuffled per item (seeded) against position bias."""
    rng = random.Random(seed)
    result = JudgeResult()
    items = enumerate(zip(questions, answers_a, answers_b, strict=True))
    for index, (question, a, b) in tqdm(
        items, total=len(questions), desc="judge", unit="pair", leave=False, disable=None
    ):
        swapped = rng.random() < 0.5
        reply = ask(judge_messages(question, b, a) if swapped else judge_messages(question, a, b))
        verdict = parse_verdict(reply)
        if verdict is None:
            winner = None
            result.unparsed += 1
        elif verdict == "tie":
            winner = "tie"
            result.ties += 1
        else:
            winner = "a" if (verdict == "A") != swapped else "b"
            result.wins += winner == "a"
            result.losses += winner == "b"
        result.verdicts.append(
            {"index": index, "swapped": swapped, "verdict": verdict, "winner": winner, "reply": reply[-300:]}
        )
    return result


def openai_judge(
    url: str, model: str, api_key: str | None = None, timeout: float = 120.0
) -> Callable[[list[Message]], str]:
    """A function sending messages to an OpenAI-compatible chat-completions endpoint and returning the reply."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def ask(messages: list[Message]) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 512}).encode()
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as err:
            raise IlaError(f"judge endpoint {endpoint} answered HTTP {err.code} ({err.reason})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise IlaError(f"judge endpoint {endpoint} is unreachable: {getattr(err, 'reason', err)}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise IlaError(f"judge endpoint {endpoint} did not answer in the chat-completions format") from None

    return ask


def prompt_ids(example: Example) -> list[int]:
    """The tokens before the first assistant answer: the prompt the model is asked to answer."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
    return example.input_ids[:first]


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    device: torch.device,
) -> list[str]:
    """Greedy answers, one prompt at a time (no padding, so batch-size effects never change an answer)."""
    answers = []
    for ids in tqdm(prompts, desc="judge: generating answers", unit="answer", leave=False, disable=None):
        input_ids = torch.tensor([ids], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),  # type: ignore[operator]
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(str(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)).strip())
    return answers
