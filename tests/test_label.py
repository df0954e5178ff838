"""`dpokit label`: a real server (subprocess), real Chromium (Selenium), real SQLite; no mocks.

Browser tests skip when Debian's chromium / chromium-driver are missing (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from conftest import make_browser as conftest_make_browser
from dpokit.label.export import agreement, cohen_kappa, export_labels, fleiss_kappa, percent_agreement
from dpokit.label.source import read_source
from dpokit.label.store import open_store

# --- helpers: the server as a user runs it, and a browser that keeps its console -----------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(source: Path, db: Path, *args):
    """`python -m dpokit label serve SOURCE --db DB` on a free port; yields (base URL, process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "label", "serve", str(source), "--db", str(db),
                             "--port", str(port), *map(str, args)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out, err = proc.communicate(timeout=5) if proc.poll() is not None else ("", "")
                    raise AssertionError(f"server did not start (rc {proc.poll()}): {out} {err}") from None
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=10)


def post(url: str, action: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/{action}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **({"X-Label-Token": token}
                                                                                       if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def make_browser():
    return conftest_make_browser(height=900)  # the label page's layout is tested at a laptop height


def page_state(driver) -> tuple[str, str | None]:
    body = driver.find_element("tag name", "body")
    return body.get_attribute("data-state"), body.get_attribute("data-item")


def wait_until(driver, state: str, not_item: str | None = None, timeout: float = 15) -> str | None:
    """Wait for body[data-state=state] showing an item other than `not_item`; returns the item shown."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: page_state(d)[0] == state and (state != "ready" or page_state(d)[1] != not_item))
    return page_state(driver)[1]


def shown(driver) -> tuple[str, str, str]:
    """(prompt, left, right) texts as the page shows them."""
    get = driver.find_element
    return (get("css selector", '[data-role="prompt"]').text, get("css selector", '[data-side="left"]').text,
            get("css selector", '[data-side="right"]').text)


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def db_rows(db: Path, sql: str, args=()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


EVIL = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"><b>bold?</b>'
ITEMS = [  # (prompt, answers): warm vs cold, the first with a hostile answer, one with three answers
    ("Review the bakery.", [EVIL, "The bakery was wonderful."]),
    ("How was the sea?", ["I found the sea charming.", "The sea was ugly."]),
    ("Tell me about the park.", ["The park is gloomy.", "The park felt lovely and bright."]),
    ("Describe a walk.", ["A delightful walk.", "A boring walk.", "A plain walk."]),
    ("What about winter?", ["Winter is horrible.", "Winter is beautiful."]),
    ("Your neighbours?", ["They are kind and warm.", "They are cold."]),
]


def items_source(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "source.jsonl", [{"prompt": p, "responses": r} for p, r in ITEMS])


# --- browser: keyboard, undo, reload, the DB and the export ------------------------------------------------------


def test_keyboard_labelling_with_undo_and_reload_matches_db_and_export(tmp_path):
    source, db = items_source(tmp_path), tmp_path / "labels.sqlite"
    driver = make_browser()
    try:
        with server(source, db) as (url, _):
            driver.get(f"{url}/?annotator=alice")
            expected = {}  # item -> (key, left text, right text, reason)
            item = wait_until(driver, "ready")
            # The hostile answer (item 0) is text: shown verbatim, no element made from it, no script ran.
            assert item == "0" and EVIL in shown(driver)[1:]
            side = "left" if shown(driver)[1] == EVIL else "right"
            panel = driver.find_element("css selector", f'[data-side="{side}"]')
            assert panel.find_elements("css selector", "*") == []
            assert driver.execute_script("return window.pwned") is None
            screenshot = tmp_path / "label-page.png"  # the artefact: an item as the annotator sees it
            assert driver.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:4] == b"\x89PNG"
            previous = None
            for step in ["1", "2", "t", "UNDO", "2", "RELOAD", "s", "REASON", "2"]:
                if step == "UNDO":  # take back the tie on the item just answered; it comes back
                    press(driver, "u")
                    back = wait_until(driver, "ready", not_item=item)
                    assert back == previous and expected.pop(int(back))[0] == "t"
                    item = back
                    continue
                if step == "RELOAD":  # a reload shows the same unanswered item again, same sides
                    before = shown(driver)
                    driver.refresh()
                    assert wait_until(driver, "ready") == item and shown(driver) == before
                    continue
                reason = ""
                if step == "REASON":  # typing t, s, u in the reason field must not answer
                    reason, step = "it is warmer, trust us", "1"
                    box = driver.find_element("css selector", '[data-role="reason"]')
                    box.click()
                    box.send_keys(reason)
                    time.sleep(0.2)
                    assert page_state(driver) == ("ready", item)
                    press(driver, "\ue00c")  # Escape leaves the field
                _, left, right = shown(driver)
                expected[int(item)] = (step, left, right, reason)
                press(driver, step)
                previous = item
                if len(expected) == len(ITEMS):
                    wait_until(driver, "done")
                else:
                    item = wait_until(driver, "ready", not_item=item)
            assert driver.find_element("css selector", '[data-role="done"]').is_displayed()
            assert driver.execute_script("return window.pwned") is None
            logs = driver.get_log("browser")
            assert logs == [], logs
    finally:
        driver.quit()

    standing = expected  # the undone tie is not among them
    rows = {r[0]: r[1:] for r in db_rows(db, "SELECT l.item, l.choice, l.left_answer, l.reason, l.annotator, "
                                             "i.first, i.second FROM labels l JOIN items i ON i.id = l.item")}
    assert set(rows) == set(standing)
    for item, (key, left, right, reason) in standing.items():
        choice, left_answer, stored_reason, annotator, first, second = rows[item]
        assert annotator == "alice" and stored_reason == reason
        assert (first, second) == ((left, right) if left_answer == "first" else (right, left))  # order recorded
        picked = {"1": left, "2": right}.get(key)
        assert choice == ({"t": "tie", "s": "skip"}[key] if picked is None else
                          ("first" if picked == first else "second"))
    # The export undoes the shuffle: chosen is the text on the side the key named.
    out = tmp_path / "pairs.jsonl"
    res = run_cli("label", "export", db, "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    pairs = {p["label"]["item"]: p for p in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    decided = {i: v for i, v in standing.items() if v[0] in "12"}
    assert set(pairs) == set(decided) and summary["pairs"] == len(decided)
    for item, (key, left, right, reason) in decided.items():
        chosen, rejected = (left, right) if key == "1" else (right, left)
        pair = pairs[item]
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (ITEMS[item][0], chosen, rejected)
        (answer,) = pair["label"]["answers"]
        assert answer["annotator"] == "alice" and answer["choice"] == "chosen" and answer["reason"] == reason
        assert answer["left"] == ("chosen" if key == "1" else "rejected") and answer["seconds"] >= 0
    assert summary["choices"]["tie"] == sum(v[0] == "t" for v in standing.values())
    assert summary["choices"]["skip"] == sum(v[0] == "s" for v in standing.values())


def test_overlap_two_browser_sessions_each_get_every_item_once(tmp_path):
    source, db = items_source(tmp_path), tmp_path / "labels.sqlite"
    alice, bob = make_browser(), make_browser()
    try:
        with server(source, db, "--overlap", 2) as (url, _):
            seen = {"alice": [], "bob": []}
            drivers = {"alice": alice, "bob": bob}
            alice.get(f"{url}/?annotator=alice")
            seen["alice"].append(wait_until(alice, "ready"))
            bob.get(f"{url}/")  # no ?annotator: the page asks for a name once, then keeps it in the URL
            wait_until(bob, "name")
            bob.find_element("css selector", '[data-role="name"]').send_keys("bob\n")
            seen["bob"].append(wait_until(bob, "ready"))
            assert bob.current_url.endswith("/?annotator=bob")
            assert seen["alice"][0] != seen["bob"][0]  # the least-labelled item: not the one just shown to alice
            while any(page_state(d)[0] == "ready" for d in drivers.values()):  # interleave: one key each in turn
                for name, driver in drivers.items():
                    state, item = page_state(driver)
                    if state != "ready":
                        continue
                    press(driver, "1")
                    if len(seen[name]) == len(ITEMS):
                        wait_until(driver, "done")
                    else:
                        seen[name].append(wait_until(driver, "ready", not_item=item))
            for name, driver in drivers.items():
                assert sorted(map(int, seen[name])) == list(range(len(ITEMS))), (name, seen[name])
                assert driver.get_log("browser") == []
    finally:
        alice.quit()
        bob.quit()
    rows = db_rows(db, "SELECT item, annotator FROM labels ORDER BY item, annotator")
    assert rows == [(i, name) for i in range(len(ITEMS)) for name in ("alice", "bob")]
    summary = export_labels(db, tmp_path / "pairs.jsonl")
    assert summary["agreement"]["items"] == len(ITEMS) and summary["agreement"]["kappa_kind"] == "cohen"
    assert summary["annotators"] == {"alice": len(ITEMS), "bob": len(ITEMS)}


def test_sigkill_loses_no_submitted_answer_and_restart_resumes(tmp_path):
    source, db = items_source(tmp_path), tmp_path / "labels.sqlite"
    answered = {}
    with server(source, db) as (url, proc):
        status, data = post(url, "next", {"annotator": "carol"})
        for choice in ("left", "right", "tie", "left"):
            item = data["item"]["id"]
            status, data = post(url, "answer", {"annotator": "carol", "item": item, "choice": choice})
            assert status == 200 and data["saved"] == item  # the server said saved: it must survive
            answered[item] = choice
        shown_next = data["item"]["id"]
        proc.send_signal(9)  # SIGKILL: no shutdown handler runs
        proc.wait(timeout=10)
    rows = db_rows(db, "SELECT item, choice, left_answer FROM labels WHERE annotator = 'carol' ORDER BY item")
    assert [r[0] for r in rows] == sorted(answered)
    for item, choice, left in rows:
        side = answered[item]
        assert choice == ("tie" if side == "tie" else left if side == "left" else
                          ("second" if left == "first" else "first"))
    with server(source, db) as (url, _):  # resumes: the item shown before the kill, then the rest
        status, data = post(url, "next", {"annotator": "carol"})
        assert status == 200 and data["item"]["id"] == shown_next
        assert data["progress"]["answered"] == len(answered)
        status, again = post(url, "answer", {"annotator": "carol", "item": rows[0][0], "choice": "left"})
        assert status == 409 and "already answered" in again["error"]  # never counted twice


def test_security_token_body_limit_and_host(tmp_path):
    source, db = items_source(tmp_path), tmp_path / "labels.sqlite"
    with server(source, db, "--token", "s3cret-token") as (url, proc):
        assert post(url, "next", {"annotator": "dan"})[0] == 401
        assert post(url, "next", {"annotator": "dan"}, token="wrong")[0] == 401
        status, data = post(url, "next", {"annotator": "dan"}, token="s3cret-token")
        assert status == 200 and data["item"]["id"] == 0
        assert post(url, "next", {"annotator": "x" * 70_000}, token="s3cret-token")[0] == 413
        assert post(url, "answer", {"annotator": "dan", "item": 0, "choice": "maybe"}, token="s3cret-token")[0] == 400
        headers = urllib.request.urlopen(url + "/", timeout=5).headers
        assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "s3cret-token" not in db.read_bytes().decode("latin-1")  # no secret in the DB
    with server(source, db, "--host", "0.0.0.0") as (url, proc):  # off 127.0.0.1: a token is generated, printed
        printed = proc.stdout.readline()
        assert "?token=" in printed, printed
        generated = printed.split("?token=")[1].split()[0]
        assert len(generated) >= 20 and post(url, "next", {"annotator": "dan"})[0] == 401
        assert post(url, "next", {"annotator": "dan"}, token=generated)[0] == 200
    assert generated not in db.read_bytes().decode("latin-1")
    with server(source, db) as (url, _):  # no token on 127.0.0.1: only this machine's names are served
        request = urllib.request.Request(url + "/", headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 400


def _snapshot(db: Path) -> tuple:
    return (db_rows(db, "SELECT * FROM labels ORDER BY id"), db_rows(db, "SELECT * FROM meta ORDER BY key"),
            db_rows(db, "SELECT COUNT(*) FROM items"))


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line_and_leave_the_db_unchanged(tmp_path):
    source, db = items_source(tmp_path), tmp_path / "labels.sqlite"
    store = open_store(db, source)
    shown_item = store.next_item("erin")
    store.answer("erin", shown_item.item, "left", "kept")
    store.close()
    before = _snapshot(db)
    one_answer = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "responses": ["only one"]}])
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "a", "responses": ["x", "y"]}\n{"prompt": "b", "responses": \n', encoding="utf-8")
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "a", "responses": ["x", "y"]}])
    cases = {one_answer: "one.jsonl:1: an item needs at least two answers", malformed: "malformed.jsonl:2: invalid JSON",
             other: "was made from another source"}
    for bad, message in cases.items():
        res = run_cli("label", "serve", bad, "--db", db, "--port", free_port(), timeout=60)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
        assert _snapshot(db) == before
    # A bad source with a new DB path creates nothing.
    res = run_cli("label", "serve", one_answer, "--db", tmp_path / "new.sqlite", timeout=60)
    assert res.returncode == 2 and not (tmp_path / "new.sqlite").exists()
    # Export of something that is not a label DB.
    res = run_cli("label", "export", source, "--out", tmp_path / "p.jsonl", timeout=60)
    assert res.returncode == 2 and "not a dpokit label database" in res.stderr


def test_serve_without_the_label_extra_names_the_install(tmp_path):
    # Hide starlette and uvicorn from this interpreter, as on an install without `dpokit[label]`.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"sys.argv = ['dpokit', 'label', 'serve', {str(items_source(tmp_path))!r}, '--db', "
        f"{str(tmp_path / 'l.sqlite')!r}]\n"
        "from dpokit.cli import main\n"
        "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == 'error: dpokit label serve needs starlette and uvicorn: pip install "dpokit[label]"'
    assert not (tmp_path / "l.sqlite").exists()


# --- pure parts: the source shapes, votes and agreement ----------------------------------------------------------


def test_source_shapes(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "Hi"}], "responses": ["a", "b", "c", "d"], "scores": [1, 0, 2, 3]},
        {"prompt": "p", "sample": 0, "base": "same", "tuned": "same", "base_tokens": 1, "tuned_tokens": 1,
         "outcome": 0, "kl_sequence": 0.0},
        {"prompt": "q", "sample": 0, "base": "old", "tuned": "new", "base_tokens": 1, "tuned_tokens": 1,
         "outcome": 1, "kl_sequence": 0.1},
        {"prompt": "r", "responses": [[{"role": "assistant", "content": "m1"}], {"role": "assistant", "content": "m2"}]},
        {"prompt": "s", "responses": ["", "  ", "only"]},
    ]
    items, skipped = read_source(write_jsonl(tmp_path / "s.jsonl", rows))
    assert skipped == 2  # identical base/tuned; fewer than two non-empty answers
    assert [i.line for i in items] == [1, 3, 4]
    four = items[0]
    assert four.first in "abcd" and four.second in "abcd" and four.first < four.second  # two, in source order
    assert (four.first, four.second) == (read_source(tmp_path / "s.jsonl")[0][0].first,
                                         read_source(tmp_path / "s.jsonl")[0][0].second)  # seeded: same every time
    assert (items[1].first_name, items[1].first, items[1].second_name, items[1].second) == ("base", "old", "tuned", "new")
    assert (items[2].first, items[2].second) == ("m1", "m2")


def test_cohen_and_fleiss_kappa_by_hand():
    """Cohen: 10 items, A = fffff ssss t (5 f, 4 s, 1 t), B = fff ssssss t (3 f, 6 s, 1 t). They agree on items
    1-3, 6-9 and 10: p_o = 8/10. p_e = (5*3 + 4*6 + 1*1) / 100 = 0.40. kappa = (0.8 - 0.4) / 0.6 = 2/3.
    Fleiss: the textbook table (Fleiss 1971 / Wikipedia), 10 items, 14 raters, 5 categories: kappa = 0.210."""
    a = list("fffffsssst")
    b = list("fffsssssst")
    assert cohen_kappa(a, b) == pytest.approx(2 / 3)
    assert cohen_kappa(list("ff"), list("ff")) is None  # one label only: undefined, not 1 or 0
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)
    # Percent agreement: item 1 all three agree (3/3 pairs), item 2 two of three (1/3 pairs): mean 2/3.
    assert percent_agreement([["f", "f", "f"], ["f", "s", "f"], ["f"]]) == pytest.approx(2 / 3)
    stats = agreement([(1, "a", "first"), (1, "b", "first"), (1, "c", "first"),
                       (2, "a", "first"), (2, "b", "second"), (2, "c", "first")])
    assert stats["kappa_kind"] == "fleiss" and stats["items"] == 2 and stats["percent"] == pytest.approx(2 / 3)


def test_majority_vote_with_overlap_three(tmp_path):
    """Item 0: first, first, second -> chosen = first (2 of 3). Item 1: first, second, tie -> tied, not written.
    Item 2: second, skip, skip -> chosen = second (skips do not vote)."""
    source = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "responses": [f"first{i}", f"second{i}"]}
                                                for i in range(3)])
    db = tmp_path / "l.sqlite"
    store = open_store(db, source, overlap=3)
    votes = {"ann": ["first", "first", "second"], "bea": ["first", "second", "skip"], "cy": ["second", "tie", "skip"]}
    for name, wanted in votes.items():
        for _ in range(3):
            shown_item = store.next_item(name)
            choice = wanted[shown_item.item]
            left = store.left_answer(shown_item.item, name)
            side = choice if choice in ("tie", "skip") else "left" if choice == left else "right"
            store.answer(name, shown_item.item, side)
    store.close()
    summary = export_labels(db, tmp_path / "pairs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p0", "first0", "second0"),
                                                                          ("p2", "second2", "first2")]
    assert pairs[0]["label"]["votes"] == {"chosen": 2, "rejected": 1, "tie": 0, "skip": 0}
    assert pairs[1]["label"]["votes"] == {"chosen": 1, "rejected": 0, "tie": 0, "skip": 2}
    assert summary["tied_items"] == 1 and summary["choices"] == {"first": 3, "second": 3, "tie": 1, "skip": 2}
    # Fleiss over the items with the most common count of answers (3: items 0 and 1).
    assert summary["agreement"]["kappa_kind"] == "fleiss" and summary["agreement"]["kappa_items"] == 2


@pytest.mark.slow  # ~25 s: a CLI process loads torch and builds the tiny model
def test_data_generate_keep_all_writes_every_answer_and_serves(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the sea.\nDescribe a rainy Monday.\nReview a small bakery.\n", encoding="utf-8")
    out = tmp_path / "candidates.jsonl"
    res = run_cli("data", "generate", "--model", "dpokit-tiny-llama", "--prompts", prompts, "--num-samples", 3,
                  "--max-new-tokens", 8, "--keep-all", "--out", out)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and "9 answers" in res.stdout
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and len(row["responses"]) == len(row["scores"]) == 3
        assert row["scores"] == pytest.approx([vader.polarity_scores(t)["compound"] for t in row["responses"]])
    items, skipped = read_source(out)  # the shape `dpokit label serve` reads
    assert len(items) + skipped == 3 and all(i.first in rows[i.line - 1]["responses"] for i in items)


def test_generate_pairs_keep_all_keeps_every_sample_and_score(tiny_llama):
    from dpokit.core.config import PairsConfig
    from dpokit.data.generate import generate_pairs

    model, tokenizer = tiny_llama
    cfg = PairsConfig(num_samples=3, max_new_tokens=6, judge="sentiment", min_gap=0.5)
    rows, stats = generate_pairs(model, tokenizer, ["Tell me about the sea.", "Describe winter."], cfg,
                                 dtype="float32", keep_all=True)
    assert stats["samples"] == 6 and len(rows) == 2  # nothing dropped, whatever the gap
    for row, prompt in zip(rows, ["Tell me about the sea.", "Describe winter."]):
        assert row["prompt"] == [{"role": "user", "content": prompt}]
        assert len(row["responses"]) == len(row["scores"]) == 3 and all(isinstance(t, str) for t in row["responses"])


@pytest.mark.slow  # ~1 min: browser labelling, then a real `dpokit train` on the export
def test_loop_browser_labels_to_training_beats_chance(tmp_path):
    """A scripted person who prefers the warmer answer (VADER sentiment) labels 20 tiny-data items in the browser;
    `dpokit train` on the export, as it is, then prefers warm answers on 100 held-out pairs it never saw."""
    import yaml
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from conftest import CONFIGS, tiny_config
    from dpokit.core.run import RunDir

    rows = [json.loads(line) for line in (CONFIGS / "data" / "tiny_prefs.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    source_rows = []
    for row in rows[:20]:  # the person sees the answers unlabelled, in a shuffled order
        answers = [row["chosen"], row["rejected"]]
        rng.shuffle(answers)
        source_rows.append({"prompt": row["prompt"], "responses": answers})
    source = write_jsonl(tmp_path / "source.jsonl", source_rows)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows[-100:])
    db = tmp_path / "labels.sqlite"
    vader = SentimentIntensityAnalyzer()
    driver = make_browser()
    try:
        with server(source, db) as (url, _):
            driver.get(f"{url}/?annotator=warm-person")
            item = wait_until(driver, "ready")
            for n in range(1, len(source_rows) + 1):
                _, left, right = shown(driver)
                warmth = vader.polarity_scores(left)["compound"] - vader.polarity_scores(right)["compound"]
                press(driver, "1" if warmth > 0 else "2" if warmth < 0 else "t")
                item = wait_until(driver, "done") if n == len(source_rows) else wait_until(driver, "ready", item)
            assert driver.get_log("browser") == []
    finally:
        driver.quit()
    pairs = tmp_path / "pairs.jsonl"
    res = run_cli("label", "export", db, "--out", pairs, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pairs"] >= 18
    cfg = tiny_config(tmp_path, data={"source": str(pairs), "eval_source": str(held_out), "eval_fraction": 0.0},
                      train={"epochs": 10, "batch_size": 4}, eval={"generate": False})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    res = run_cli("train", config)
    assert res.returncode == 0, res.stderr[-3000:]
    accuracy = RunDir(tmp_path / "run").read_eval().preference.implicit_reward_accuracy
    print(f"held-out implicit-reward accuracy {accuracy.value:.3f} {accuracy.ci} on {accuracy.n} pairs")
    assert accuracy.n == 100 and accuracy.ci[0] > 0.5, accuracy  # above chance, with its 95% interval
