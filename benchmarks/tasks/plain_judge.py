"""Cross-task judge "plain words" (issue 26): prefers advice in short, common words, with at least 12 words.

    score = share of words of at most 2 syllables - share of words of 4+ syllables
            + (distinct_words / words - 1) - max(0, 12 - words) / 12

Syllables are counted as vowel groups (an approximation good enough to separate "use" from "utilisation"). The
repetition and minimum-length terms stop "plain" from being won by "do it do it do it".
"""


def syllables(word: str) -> int:
    word = "".join(c for c in word.lower() if c.isalpha())
    if not word:
        return 0
    groups, previous = 0, False
    for c in word:
        vowel = c in "aeiouy"
        groups += vowel and not previous
        previous = vowel
    if word.endswith("e") and groups > 1 and not word.endswith(("le", "ee")):
        groups -= 1
    return max(groups, 1)


def score(prompt, response) -> float:
    words = [w for w in response.split() if any(c.isalpha() for c in w)]
    if not words:
        return -2.0
    counts = [syllables(w) for w in words]
    short = sum(c <= 2 for c in counts) / len(words)
    long = sum(c >= 4 for c in counts) / len(words)
    distinct = len({w.lower().strip(".,!?;:") for w in words}) / len(words)
    return short - long + (distinct - 1.0) - max(0, 12 - len(words)) / 12
