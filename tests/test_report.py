"""End to end on the tiny model: train -> eval.json with every field -> report rendered in headless Chromium ->
compare; and a beta sweep with its frontier report (slow)."""

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import tiny_config

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr",
                  "--v=0", "--window-size=1200,1800"]


def render(html_path, tmp_path):
    """Screenshot the page in headless Chromium; returns (PIL image, console lines). Chromium logs every console
    message (errors, uncaught exceptions) as an ':INFO:CONSOLE' line on stderr with --enable-logging=stderr."""
    from PIL import Image

    shot = tmp_path / f"{html_path.stem}.png"
    res = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                          f"--screenshot={shot}", html_path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    return Image.open(shot).convert("RGB"), console


def not_blank(image) -> bool:
    """More than 2% non-white pixels and more than 16 distinct colours (text, tables and plots)."""
    small = image.resize((300, 450))
    pixels = list(small.getdata())
    non_white = sum(1 for p in pixels if sum(p) < 720)
    return non_white > 0.02 * len(pixels) and len(set(pixels)) > 16


GEN_FIELDS = {"n_prompts", "samples_per_prompt", "n_samples", "decoding", "judge", "outcomes", "scores", "lengths",
              "length_controlled"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config(tmp, train={"max_steps": 8, "learning_rate": 1e-3},
                      eval={"num_prompts": 5, "samples_per_prompt": 2, "max_new_tokens": 12})
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("train", path)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run", res


def test_eval_json_has_every_field(tiny_run):
    run, res = tiny_run
    result = json.loads((run / "eval.json").read_text())
    assert {"schema_version", "run_dir", "model", "beta", "preference", "generation", "kl"} <= set(result)
    pref = result["preference"]
    for metric in (pref["implicit_reward_accuracy"], pref["reward_margin"],
                   *[pref["likelihood_accuracy"][w][k] for w in ("base", "tuned") for k in ("sum", "mean_per_token")]):
        assert {"value", "ci", "n"} <= set(metric) and len(metric["ci"]) == 2
    gen = result["generation"]
    assert GEN_FIELDS <= set(gen)
    assert gen["n_samples"] == 10 and gen["judge"] == {"name": "sentiment", "kind": "pointwise", "details": {}}
    out = gen["outcomes"]
    assert out["wins"] + out["ties"] + out["losses"] + out["unparseable"] == 10
    for key in ("win", "tie", "loss", "win_rate"):
        assert len(out[key]["ci"]) == 2
    for who in ("base", "tuned"):
        assert len(gen["scores"][f"{who}_values"]) == 10 and "ci" in gen["scores"][who]
        lengths = gen["lengths"][who]
        assert sum(lengths["histogram"]) == 10 and len(lengths["values"]) == 10
        assert all(1 <= n <= 12 for n in lengths["values"]) and "ci" in lengths["mean"]
    assert [b["bucket"] for b in gen["length_controlled"]["buckets"]] == ["tuned_shorter", "length_matched",
                                                                          "tuned_longer"]
    assert sum(b["n"] + b["unparseable"] for b in gen["length_controlled"]["buckets"]) == 10
    assert "regression" in gen["length_controlled"]
    kl = result["kl"]
    assert kl["n_samples"] == 10 and kl["total_tokens"] == sum(gen["lengths"]["tuned"]["values"])
    assert kl["exact_sampling"] is True and len(kl["sequence"]["ci"]) == 2 and len(kl["per_token"]["ci"]) == 2
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and {"prompt", "base", "tuned", "outcome", "kl_sequence"} <= set(samples[0])
    # The mean of the per-sample log-ratios is the reported KL.
    assert kl["sequence"]["value"] == pytest.approx(sum(s["kl_sequence"] for s in samples) / 10)
    assert "KL(tuned||base) per token" in res.stdout and "tuned wins" in res.stdout


def test_report_renders_in_chromium(tiny_run, cli, tmp_path):
    run, _ = tiny_run
    res = cli("report", run)
    assert res.returncode == 0, res.stderr[-2000:]
    html_path = run / "report.html"
    text = html_path.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    assert text.count("data:image/png;base64,") == 4  # curves, outcomes, lengths, scores
    assert "implicit-reward accuracy" in text and "KL(tuned||base)" in text
    md = (run / "report.md").read_text()
    assert "| preference | implicit-reward accuracy" in md and (run / "report_plots" / "training_curves.png").is_file()
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); HTML checked without rendering")
    image, console = render(html_path, tmp_path)
    assert not_blank(image)
    assert console == [], console
    shutil.copy(tmp_path / "report.png", run / "report_screenshot.png")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_chromium_check_catches_errors_and_blank_pages(tmp_path):
    """The render check itself: a page with a JS error is caught, a blank page is blank."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><h1>x</h1><script>throw new Error('boom42')</script></body></html>")
    _, console = render(bad, tmp_path)
    assert any("boom42" in line for line in console)
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    image, console = render(blank, tmp_path)
    assert not not_blank(image) and console == []


def test_compare_side_by_side(tiny_run, cli):
    run, _ = tiny_run
    res = cli("compare", run, "--prompt", "How was the sea?", "--samples", "2", "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "base" in res.stdout and "tuned" in res.stdout and "sentiment score" in res.stdout


def test_report_without_eval_is_user_error(cli, tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  source: x.jsonl\n")
    res = cli("report", tmp_path)
    assert res.returncode == 2 and "dpokit eval" in res.stderr and "Traceback" not in res.stderr


def test_sweep_override_parsing():
    from dpokit.sweep import split_overrides, sweep_points

    fixed, swept = split_overrides(["train.beta=0.05,0.1", "train.max_steps=3", "train.loss=sigmoid,ipo"])
    assert fixed == ["train.max_steps=3"]
    assert swept == [("train.beta", ["0.05", "0.1"]), ("train.loss", ["sigmoid", "ipo"])]
    assert sweep_points(swept)[1] == ["train.beta=0.05", "train.loss=ipo"] and len(sweep_points(swept)) == 4


@pytest.mark.slow
def test_sweep_beta_frontier(cli, tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 4}, eval={"num_prompts": 3, "max_new_tokens": 8})
    cfg["output"]["dir"] = str(tmp_path / "sweep")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = cli("sweep", path, "--set", "train.beta=0.05,0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["train.beta=0.05", "train.beta=0.5"]
    for row in summary["runs"]:
        assert isinstance(row["kl"], float) and isinstance(row["reward"], float)
        assert yaml.safe_load(open(f"{row['run_dir']}/config.yaml"))["train"]["beta"] in (0.05, 0.5)
    html_text = (tmp_path / "sweep" / "sweep.html").read_text()
    assert "data:image/png;base64," in html_text and "reward vs KL" in html_text
    if CHROMIUM:
        image, console = render(tmp_path / "sweep" / "sweep.html", tmp_path)
        assert not_blank(image) and console == []


def test_report_training_section_renders_in_the_browser(tiny_run, browser, tmp_path):
    """The "How it was trained" section: visible, with a header row, and the numbers of this run's own files."""
    from selenium.webdriver.common.by import By

    run, _ = tiny_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    browser.get((run / "report.html").resolve().as_uri())
    heading = browser.find_element(By.ID, "how-trained")
    table = browser.find_element(By.CSS_SELECTOR, "table.training")
    assert heading.is_displayed() and table.is_displayed()
    assert table.size["width"] > 300 and table.size["height"] > 200, table.size
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headers == ["setting", "value"]  # no empty header row
    rows = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert rows["loss"].startswith(f"{cfg['train']['loss']}, beta {cfg['train']['beta']:g}")
    assert rows["fine-tuning"] == "full (every weight trained)"
    assert rows["steps"].startswith(f"{summary['global_step']} optimizer steps")
    assert rows["reference"] == summary["reference"] and rows["precision"] == "fp32"
    assert rows["step-0 check"].startswith("passed: loss 0.693147")
    assert "tiny_prefs.jsonl" in rows["data"] and "torch " in rows["versions"] and "dpokit " in rows["versions"]
    assert rows["date"].endswith("UTC") and rows["date"][:2] == "20"
    shot = tmp_path / "training_section.png"
    table.screenshot(str(shot))
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size[0] > 300 and not_blank(image.resize((image.size[0], max(image.size[1], 450))))


def _iterate_summary(model: str) -> dict:
    def arm(k):
        return {"round": k, "win_rate_vs_initial": 0.6, "win_rate_vs_initial_ci": [0.5, 0.7],
                "win_rate_vs_previous": 0.55, "win_rate_vs_previous_ci": [0.4, 0.6], "mean_score": 0.2 * k,
                "mean_score_ci": [0.1, 0.3], "kl_from_initial": 0.3 * k, "kl_from_initial_ci": [0.2, 0.4],
                "mean_length": 10.0, "distinct_2": 0.5, "pairs": 20, "steps": 4, "seconds": 3.2}
    return {"rounds": [arm(1), arm(2)], "offline": {**arm(2), "round": None},
            "initial": {"mean_score": 0.1, "mean_score_ci": [0.0, 0.2], "mean_length": 9.0, "distinct_2": 0.4},
            "judge": "sentiment", "model": model, "reference": "frozen", "rounds_planned": 3, "held_out_prompts": 8,
            "last_round_vs_offline": {"win_rate": 0.5, "win_rate_ci": [0.3, 0.7]},
            "verdict": "Better: it's good", "outcome": "better"}


def test_sweep_and_iterate_reports_escape_user_text_and_share_one_context(tmp_path):
    """The templates autoescape: a label or model name with markup is text in the HTML (and as typed in the
    Markdown); both documents come from one context, so their table rows carry the same cells."""
    from dpokit.report import write_iterate_report, write_sweep_report

    rows = [{"label": "<script>alert(1)</script>", "kl": 0.5, "kl_ci": [0.4, 0.6], "reward": 0.3,
             "reward_ci": [0.2, 0.4], "accuracy": 0.7, "run_dir": "runs/a|b", "base_reward": 0.1}]
    (tmp_path / "sweep").mkdir()
    page = write_sweep_report(tmp_path / "sweep", rows, "mean score").read_text()
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "<script" not in page and "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page
    assert "| <script>alert(1)</script> | 0.500 [0.400, 0.600] | 0.300 [0.200, 0.400] | 0.700 | runs/a\\|b |" in md
    assert "![reward vs KL](sweep_frontier.png)" in md and (tmp_path / "sweep" / "sweep_frontier.png").is_file()

    (tmp_path / "it").mkdir()
    page = write_iterate_report(tmp_path / "it", _iterate_summary("<img src=x onerror=alert(1)>")).read_text()
    md = (tmp_path / "it" / "iterate.md").read_text()
    assert page.split("<body>", 1)[1].startswith('<p id="verdict" class="verdict ok">Better: it&#x27;s good</p>')
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;, judge sentiment" in page
    assert md.startswith("**Better: it's good**") and page.count("data:image/png;base64,") == 2
    for cells in (["round 2", "0.600 [0.500, 0.700]", "0.550 [0.400, 0.600]", "0.400 [0.100, 0.300]"], ["pi0", "0.500", "–"]):
        assert "<td>" + "</td><td>".join(cells) in page and "| " + " | ".join(cells) in md
    assert all((tmp_path / "it" / "iterate_plots" / f"{k}.png").is_file() for k in ("by_round", "frontier"))
