"""A python judge for demos and tests on the tiny models: the longer answer (in characters) is preferred.

dpokit's tiny random models write garbage text, which a real judge (sentiment, a reward model) scores as all
alike; answer length still tells answers apart, so on-policy pairs and win rates have something to measure.
Used by configs/tiny-iterate.yaml as `judge: python`, `judge_options: {function: configs/judges/answer_length.py:score}`
(the path is relative to the current directory: run from the repository root).
"""


def score(prompt, response) -> float:
    return float(len(response))
