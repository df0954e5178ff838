"""Cross-task judge "concise" (issue 26): prefers a short, finished, plain-prose answer of about 20 words.

Not monotone in length on purpose: an answer shorter than the target loses as surely as a longer one, so a model
that over-optimises toward "shorter is better" (the failure issue 26 reports: answers collapsed to 8 tokens) is
scored down, as a person asking for a short explanation would.

    score = -|words - 20| / 20  + 0.5 * finished - 0.5 * list_like + (distinct_words / words - 1)
"""

import re

TARGET_WORDS = 20


def score(prompt, response) -> float:
    words = response.split()
    if not words:
        return -2.0
    finished = response.rstrip().endswith((".", "!", "?"))
    list_like = bool(re.search(r"(^|\n)\s*(?:[-*\u2022]|\d+[.)])\s", response))
    distinct = len({w.lower().strip(".,!?;:") for w in words}) / len(words)
    return -abs(len(words) - TARGET_WORDS) / TARGET_WORDS + 0.5 * finished - 0.5 * list_like + (distinct - 1.0)
