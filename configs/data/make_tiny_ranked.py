"""Writes tiny_ranked.jsonl: the tiny warm-vs-cold task with 4 scored answers per prompt (issue 16).

Same topics, prompts and words as make_tiny_prefs.py. Each prompt gets four answers whose score is their warmth:
two warm words (3), warm + neutral (2), cold + neutral (1), two cold words (0). Held-out topics test whether the
model learned the ordering. Run: python make_tiny_ranked.py
"""

import json
import random
from pathlib import Path

from make_tiny_prefs import BAD, GOOD, PROMPTS, SHAPES, TOPICS

NEUTRAL = ["plain", "quiet", "ordinary", "usual", "simple", "calm"]


def answer(rng, topic, first, second):
    a, b = rng.choice(first), rng.choice(second)
    return " " + rng.choice(SHAPES).format(t=topic, T=topic[0].upper() + topic[1:], a=a, b=b)


def main():
    rng = random.Random(1)
    rows = []
    for topic in TOPICS:
        for template in rng.sample(PROMPTS, 4):
            levels = [(3, GOOD, GOOD), (2, GOOD, NEUTRAL), (1, BAD, NEUTRAL), (0, BAD, BAD)]
            rng.shuffle(levels)  # the file does not give the answers in score order
            rows.append({"prompt": template.format(t=topic),
                         "completions": [{"response": answer(rng, topic, a, b), "overall_score": float(score)}
                                         for score, a, b in levels]})
    out = Path(__file__).with_name("tiny_ranked.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
