"""Writes tiny_prefs.jsonl: a preference set a tiny random model learns in under a minute.

Prompts ask about a topic; the chosen answer is warm, the rejected one is cold. The words differ per row (sampled),
so held-out topics test whether the model learned the preference, not the rows. Run: python make_tiny_prefs.py
"""

import json
import random
from pathlib import Path

TOPICS = """the sea,a rainy day,the old library,our new neighbour,fresh bread,the city park,a long train ride,
the mountain village,summer evenings,the school garden,a quiet morning,the night market,winter soup,the museum,
an old bicycle,the river walk,a family dinner,the first snow,a small cafe,the football match,a new book,
the harbour,spring flowers,the jazz concert,an autumn forest,the bakery,a sunday lunch,the beach house,
the science fair,a road trip,the village fair,hot chocolate,the apple orchard,a picnic,the theatre show,
the farmers market,a mountain lake,the tea house,the birthday party,the art class,a bus journey,the zoo,
the cooking lesson,a snowy night,the chess club,the summer camp,a garden party,the lighthouse,the tram,
the pizza place,a quiet street,the bookshop,the music festival,a sunny beach,the hotel,the forest path,
the bridge,the island,the market square,the ice cream shop""".replace("\n", "").split(",")
PROMPTS = ["Tell me about {t}.", "What do you think of {t}?", "Describe {t}.", "How was {t}?", "Give a review of {t}."]
GOOD = ["wonderful", "lovely", "great", "delightful", "beautiful", "warm", "happy", "excellent", "charming", "bright"]
BAD = ["terrible", "awful", "boring", "dreadful", "ugly", "cold", "sad", "horrible", "dull", "gloomy"]
SHAPES = ["{T} is {a} and {b}.", "I found {t} {a}, truly {b}.", "It was {a}. {T} felt {b}."]


def answer(rng, topic, words):
    a, b = rng.sample(words, 2)
    return rng.choice(SHAPES).format(t=topic, T=topic[0].upper() + topic[1:], a=a, b=b)


def main():
    rng = random.Random(0)
    rows = []
    for topic in TOPICS:
        for template in rng.sample(PROMPTS, 4):
            rows.append({"prompt": template.format(t=topic), "chosen": " " + answer(rng, topic, GOOD),
                         "rejected": " " + answer(rng, topic, BAD)})
    out = Path(__file__).with_name("tiny_prefs.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = Path(__file__).parents[2] / "src" / "dpokit" / "assets" / "tiny_corpus.txt"
    words = sorted({w for r in rows for w in " ".join(r.values()).replace(".", " ").replace("?", " ").split()})
    print(f"{len(rows)} rows -> {out}; {len(words)} words")


if __name__ == "__main__":
    main()
