"""Evaluating a vision-language run (issue 29): held-out preference accuracy from training's packed vision layout,
answers generated from the held-out images and judged by a python judge that receives the images, KL, eval_samples
naming the images; the report's thumbnails; bad inputs (an image gone since training, a text-only judge) exit 2
with one line before any model loads. Real tiny VLM (dpokit-tiny-vlm), real CLI subprocesses, real browser."""

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dpokit.core.config import load_config
from dpokit.core.judges import PythonJudge, compare, takes_three_arguments

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-vlm.yaml"
MAKE_SHAPES = ROOT / "configs" / "data" / "make_shapes_prefs.py"
SHAPES_JUDGE = ROOT / "configs" / "judges" / "shapes.py"

# A judge that records what it was given (a file: `dpokit eval` in a subprocess imports it by path).
RECORDING_JUDGE = '''
import json, os

def score(prompt, response, images):
    with open(os.environ["JUDGE_LOG"], "a") as fh:
        fh.write(json.dumps({"types": [type(i).__name__ for i in images], "sizes": [list(i.size) for i in images],
                             "prompt_has_image_part": any(p.get("type") == "image" for m in prompt
                                                          for p in m["content"])}) + "\\n")
    return float(len(response))
'''


def make_shapes(out: Path) -> Path:
    """The shapes set written by its script (a real subprocess) into `out`."""
    subprocess.run([sys.executable, str(MAKE_SHAPES), str(out)], check=True, capture_output=True)
    return out / "shapes_prefs.jsonl"


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """A LoRA run on a fresh copy of the shapes set (4 steps, no evaluation yet): (run folder, data folder)."""
    from dpokit.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("vlm-eval")
    data = make_shapes(tmp / "shapes")
    cfg = load_config(CONFIG, [f"data.source={data}", f"output.dir={tmp / 'run'}", "train.max_steps=4",
                               f"eval.judge_options.function={SHAPES_JUDGE}:score", "eval.num_prompts=4",
                               "eval.max_new_tokens=6"])
    run_training(cfg)
    return tmp / "run", data.parent


def test_takes_three_arguments_keeps_two_argument_judges_working():
    from PIL import Image as PILImage

    def two(prompt, response):
        return float(len(response))

    def three(prompt, response, images):
        return float(images[0].width)

    def star(*args):
        return float(len(args))

    assert not takes_three_arguments(two) and takes_three_arguments(three) and takes_three_arguments(star)
    imgs = [[PILImage.new("RGB", (7, 5))], [PILImage.new("RGB", (9, 5))]]
    got = compare(PythonJudge(three), ["p", "q"], ["a", "bb"], ["ccc", "d"], images=imgs)
    assert got.scores_a == [7.0, 9.0] and got.outcomes == [0, 0]
    got = compare(PythonJudge(two), ["p", "q"], ["a", "bb"], ["ccc", "d"], images=imgs)
    assert got.scores_a == [1.0, 2.0] and got.outcomes == [-1, 1]
    assert compare(PythonJudge(star), ["p"], ["a"], ["b"], images=[[]]).scores_a == [3.0]


def test_evaluate_vision_run_preference_generation_kl_and_images(vision_run, tmp_path, monkeypatch):
    from dpokit import evaluate

    run, _ = vision_run
    judge = tmp_path / "recording_judge.py"
    judge.write_text(RECORDING_JUDGE)
    log = tmp_path / "judge.jsonl"
    monkeypatch.setenv("JUDGE_LOG", str(log))
    result = evaluate(run, overrides=[f"eval.judge_options.function={judge}:score"])

    pref = result.preference
    assert pref.n_pairs == 12  # the 12 held-out pairs, each scored by tuned and base
    acc = pref.implicit_reward_accuracy
    assert 0 <= acc.value <= 1 and acc.ci[0] <= acc.value <= acc.ci[1]
    assert result.generation.n_prompts == 4 and result.generation.decoding.engine == "hf"
    assert result.kl.n_samples == 4 and result.kl.total_tokens > 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 8  # 4 tuned + 4 base answers, each judged with its prompt's PIL image
    assert all(c["types"] == ["Image"] and c["sizes"] == [[32, 32]] and c["prompt_has_image_part"] for c in calls)

    held_out = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["images"] for s in samples] == [r["images"] for r in held_out[:4]]
    assert all(Path(p).is_absolute() and Path(p).is_file() for s in samples for p in s["images"])
    assert all("<image>" not in s["tuned"] for s in samples)  # the placeholder token is never sampled
    saved = json.loads((run / "eval.json").read_text())
    assert saved["settings"]["judge_options"]["function"].endswith("recording_judge.py:score")


def test_vision_pair_logps_match_the_padded_reference_layout(vision_run):
    """Evaluation's packed layout (each pair once, its image once) gives the log-probs of the reference layout
    (two rows per pair, every image encoded twice) on the trained adapter."""
    import torch
    from peft import PeftModel

    from dpokit.core.batching import sequence_logps
    from dpokit.core.scoring import pair_logps
    from dpokit.core.vision import load_processor, load_vlm, pad_vision_pairs
    from dpokit.eval.vision import encode_eval_pairs, read_eval_images

    run, _ = vision_run
    rows = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()][:4]
    processor = load_processor(str(run / "model"))
    model = PeftModel.from_pretrained(load_vlm("dpokit-tiny-vlm"), str(run / "model")).eval()
    enc = encode_eval_pairs(rows, read_eval_images(rows, run / "data" / "eval.jsonl"), processor)
    packed = pair_logps(model, enc, processor.tokenizer.pad_token_id, batch_size=4)
    with torch.no_grad():
        padded = sequence_logps(model, pad_vision_pairs(enc, processor.tokenizer.pad_token_id))
    for key in ("chosen", "rejected"):
        assert packed[key] == pytest.approx(padded[key].tolist(), abs=1e-4)


def test_report_shows_thumbnails_beside_the_answers_escaped(vision_run, tmp_path):
    """The HTML report puts each sampled prompt's image in the prompt's cell of the samples table as a small PNG
    data URI with alt text; prompt text stays text; the Markdown names the image files."""
    from dpokit.report import write_report

    run, _ = vision_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if not (copy / "eval.json").is_file():
        from dpokit import evaluate

        evaluate(copy, overrides=["eval.judge=sentiment", "eval.judge_options={}"])
    samples = [json.loads(line) for line in (copy / "eval_samples.jsonl").read_text().splitlines()]
    samples[0]["prompt"][0]["content"][1]["text"] = "<script>window.pwned=1</script> & what?"
    gone = str(tmp_path / "moved-since.png")
    samples.append(dict(samples[-1], images=[gone]))  # an image gone by report time: named, not fatal
    (copy / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    html = write_report(copy).read_text()
    assert "<script>window.pwned" not in html and "&lt;script&gt;window.pwned=1&lt;/script&gt; &amp; what?" in html
    samples_table = html[html.index('<table class="samples">'):]
    rows = samples_table.split('<tr class="sample">')[1:]
    assert len(rows) == len(samples)
    assert f'<span class="missing">image {gone} cannot be read (FileNotFoundError)</span>' in rows[-1]
    for row, sample in zip(rows[:-1], samples[:-1], strict=True):
        first_cell = row.split("</td>")[0]
        assert f'alt="prompt image {Path(sample["images"][0]).name}"' in first_cell
        src = first_cell.split('src="')[1].split('"')[0]
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.size == (32, 32)  # already under the thumbnail size: not enlarged
    md = (copy / "report.md").read_text()
    assert f"(images: {samples[1]['images'][0]})" in md


def _unevaluated_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the trained run without its evaluation, so a refused `dpokit eval` must leave none behind."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("eval.json", "eval_samples.jsonl"):
        (copy / name).unlink(missing_ok=True)
    return copy


def test_moved_image_at_eval_time_exits_2_with_one_line_and_writes_nothing(vision_run, cli, tmp_path):
    copy = _unevaluated_copy(vision_run[0], tmp_path)
    held_out = [json.loads(line) for line in (copy / "data" / "eval.jsonl").read_text().splitlines()]
    image = Path(held_out[2]["images"][0])
    moved = image.with_suffix(".moved")
    image.rename(moved)
    try:
        result = cli("eval", copy)
    finally:
        moved.rename(image)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{copy / 'data' / 'eval.jsonl'}:3" in lines[0] and str(image) in lines[0] and "not found" in lines[0]
    assert "put the file back" in lines[0]
    assert not (copy / "eval.json").exists() and not (copy / "eval_samples.jsonl").exists()


@pytest.mark.parametrize("command, judge", [
    ("train", ["eval.judge=llm", "eval.judge_options.model=smollm2-135m-instruct"]),
    ("plan", ["eval.judge=reward-model", "eval.judge_options.model=OpenAssistant/reward-model-deberta-v3-large-v2"]),
])
def test_text_only_judge_on_a_vision_run_exits_2_at_planning(cli, tmp_path, command, judge):
    """`dpokit train` and `dpokit plan` (the same static checks) refuse before any weights load."""
    sets = [a for s in (f"output.dir={tmp_path / 'run'}", *judge) for a in ("--set", s)]
    name = judge[0].split("=")[1]
    result = cli(command, CONFIG, *sets, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"eval.judge: {name} reads text only and cannot see the prompts' images" in lines[0]
    assert "eval.judge: python with a function score(prompt, response, images)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_vision_plan_allows_image_judges_and_no_generation(tmp_path):
    """The python judge (images or not), sentiment (answer text only) and eval.generate: false plan; the llm judge
    is named with the fix (in-process: the same plan_training as the CLI)."""
    from dpokit.core.errors import UserError
    from dpokit.train.plan import plan_training

    def plan(*sets):
        return plan_training(load_config(CONFIG, [f"output.dir={tmp_path / 'run'}",
                                                  f"eval.judge_options.function={SHAPES_JUDGE}:score", *sets]))

    assert plan().evaluate and plan().vision and plan().select == "last"
    assert plan("eval.judge=sentiment", "eval.judge_options={}").evaluate
    assert plan("eval.judge=llm", "eval.generate=false").evaluate
    with pytest.raises(UserError, match="eval.judge: llm reads text only"):
        plan("eval.judge=llm", "eval.judge_options={model: smollm2-135m-instruct}")
    with pytest.raises(UserError, match="train.select: best_judge is not wired for image data"):
        plan("train.select=best_judge")


def test_text_only_judge_at_dpokit_eval_of_a_vision_run_exits_2(vision_run, cli, tmp_path):
    copy = _unevaluated_copy(vision_run[0], tmp_path)
    result = cli("eval", copy, "--set", "eval.judge=llm", "--set", "eval.judge_options.model=smollm2-135m-instruct")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "eval.judge: llm reads text only" in lines[0], lines
    assert not (copy / "eval.json").exists()


@pytest.mark.slow
def test_end_to_end_shapes_train_eval_report_in_the_browser(cli, tmp_path):
    """Generate the shapes set, `dpokit train` (LoRA, evaluation on, the shapes judge that reads the picture),
    `dpokit report`, and open the report in headless Chromium: every sample row shows its prompt's thumbnail (loaded:
    naturalWidth > 0) in the same row as the base and tuned answers."""
    from conftest import make_browser

    data = make_shapes(tmp_path / "shapes")
    run = tmp_path / "run"
    result = cli("train", CONFIG, "--set", f"data.source={data}", "--set", f"output.dir={run}",
                 "--set", "train.epochs=6", cwd=ROOT, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run / "eval.json").read_text())
    acc = saved["preference"]["implicit_reward_accuracy"]
    assert saved["preference"]["n_pairs"] == 12 and 0 <= acc["value"] <= 1 and len(acc["ci"]) == 2
    assert saved["generation"]["judge"]["name"] == "python" and saved["kl"]["n_samples"] == 12
    print(f"held-out implicit-reward accuracy {acc['value']:.3f} {acc['ci']}, win rate "
          f"{saved['generation']['outcomes']['win_rate']['value']:.3f}")

    report = cli("report", run)
    assert report.returncode == 0, report.stderr[-2000:]
    driver = make_browser()
    try:
        driver.get((run / "report.html").as_uri())
        rows = driver.find_elements("css selector", "table.samples tr.sample")
        assert len(rows) == 12
        for row in rows:
            cells = row.find_elements("tag name", "td")
            thumb = cells[0].find_element("css selector", "img.thumb")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) > 0
            assert thumb.is_displayed() and thumb.get_attribute("alt").startswith("prompt image ")
            assert thumb.location["y"] < cells[1].location["y"] + cells[1].size["height"]  # beside the answers
            assert cells[1].text.strip() or cells[2].text.strip()  # the base and tuned answers in that row
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_parquet_image_bytes_are_kept_in_the_run_folder_and_evaluate(tmp_path):
    """RLAIF-V rows whose images are parquet bytes (no file): training saves each in RUN/data/images/ and records
    that path, so the run evaluates (the images read again) and the samples name them."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from dpokit import evaluate
    from dpokit.train.trainer import run_training

    images, chosen, rejected = [], [], []
    for i in range(6):
        colour = [(220, 30, 30), (30, 60, 220)][i % 2]
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        chosen.append("Red." if i % 2 == 0 else "Blue.")
        rejected.append("Blue." if i % 2 == 0 else "Red.")
    ds = Dataset.from_dict({"image": images, "question": ["Colour?"] * 6, "chosen": chosen, "rejected": rejected},
                           features=Features({"image": ImageFeature(), "question": Value("string"),
                                              "chosen": Value("string"), "rejected": Value("string")}))
    ds.to_parquet(str(tmp_path / "rlaif.parquet"))
    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"data.source={tmp_path / 'rlaif.parquet'}", f"output.dir={run}", "train.max_steps=1",
                               "data.eval_fraction=0.34", "eval.generate=false"])
    run_training(cfg)
    held_out = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()]
    paths = [Path(p) for r in held_out for p in r["images"]]
    assert len(held_out) == 2 and all(p.parent == (run / "data" / "images").resolve() and p.is_file() for p in paths)
    with Image.open(paths[0]) as img:
        assert img.size == (32, 32)
    result = evaluate(run)
    assert result.preference.n_pairs == 2 and result.generation is None


def test_export_answers_of_a_vision_run_is_refused_before_any_model_loads(vision_run, tmp_path):
    from dpokit.core.errors import UserError
    from dpokit.eval.answers import export_answers

    run, _ = vision_run
    with pytest.raises(UserError, match="--export: .* is a vision-language run"):
        export_answers(run, "alpaca_eval", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("sets", [
    ["model.name_or_path=dpokit-tiny-smolvlm", "eval.samples_per_prompt=2"],  # Idefics3-style, LoRA
    ["train.lora=null"],  # a full fine-tune: base is the untouched model, not the disabled adapter
])
def test_evaluate_idefics3_style_and_full_fine_tune_runs(tmp_path, sets):
    from dpokit import evaluate
    from dpokit.train.trainer import run_training

    run = tmp_path / "run"
    run_training(load_config(CONFIG, [f"output.dir={run}", "train.max_steps=2", "eval.num_prompts=2",
                                      "eval.max_new_tokens=4", f"eval.judge_options.function={SHAPES_JUDGE}:score",
                                      *sets]))
    result = evaluate(run)
    k = 2 if "eval.samples_per_prompt=2" in sets else 1
    assert result.preference.n_pairs == 12 and result.generation.n_samples == 2 * k and result.kl.n_samples == 2 * k
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["sample"] for s in samples] == list(range(k)) * 2 and all(len(s["images"]) == 1 for s in samples)
