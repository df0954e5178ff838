"""Run config: validation errors name the key and the fix; overrides; shipped configs load."""

from pathlib import Path

import pytest
import yaml

from dpokit.core.config import load_config, section_from_dict
from dpokit.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def base(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return {"data": {"source": str(data)}, "output": {"dir": str(tmp_path / "out")}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.name == "quickstart.yaml":  # data.source is filled in by `dpokit quickstart` with generated pairs
        from dpokit.quickstart import load_quickstart_config

        cfg = load_quickstart_config(path)
    elif path.name.endswith("iterate.yaml"):  # likewise `dpokit iterate`, with the pairs of each round
        from dpokit.iterate import load_iterate_config

        cfg = load_iterate_config(path)
    else:
        cfg = load_config(path)
    assert cfg.data.source


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    raw = base(tmp_path)
    raw["train"] = {"betta": 0.2}
    with pytest.raises(UserError, match=r"train\.betta: unknown key; did you mean train\.beta\? valid keys in train: .*beta"):
        load_config(write(tmp_path, raw))


def test_wrong_type_and_all_problems_at_once(tmp_path):
    raw = base(tmp_path)
    raw["train"] = {"beta": "high", "batch_size": 0}
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, raw))
    msg = str(err.value)
    assert "train.beta" in msg and "train.batch_size" in msg and "\n" not in msg


def test_missing_data_file(tmp_path):
    raw = base(tmp_path)
    raw["data"]["source"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=r"data\.source: .*nope\.jsonl.* not found"):
        load_config(write(tmp_path, raw))


def test_missing_required_section(tmp_path):
    with pytest.raises(UserError, match=r"data: required"):
        load_config(write(tmp_path, {"train": {"beta": 0.1}}))


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(UserError, match=r"line 2.*malformed YAML"):
        load_config(write(tmp_path, "data:\n  source: a: b\n"))


def test_set_overrides_parse_types(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path)), ["train.beta=0.25", "train.lora.r=4", "eval.enabled=false"])
    assert cfg.train.beta == 0.25 and cfg.train.lora.r == 4 and cfg.eval.enabled is False


def test_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(write(tmp_path, base(tmp_path)), ["beta"])


def test_relative_data_path_resolves_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    cfg = load_config(write(tmp_path / "sub", {"data": {"source": "d.jsonl"}}))
    assert Path(cfg.data.source) == (tmp_path / "sub" / "d.jsonl").resolve()


def test_adapter_reference_needs_lora(tmp_path):
    raw = base(tmp_path)
    raw["train"] = {"reference": "adapter"}
    with pytest.raises(UserError, match="needs train.lora"):
        load_config(write(tmp_path, raw))


def test_a_run_folders_config_yaml_loads_as_a_config(tmp_path):
    """RUN_DIR/config.yaml carries the folder's schema_version; `dpokit train RUN_DIR/config.yaml --resume` reads it."""
    from dpokit.core.config import config_from_dict
    from dpokit.core.run import RunDir

    cfg = config_from_dict(base(tmp_path))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(cfg)
    assert "schema_version" in run.config.read_text()
    assert load_config(run.config) == cfg


def test_reference_batch_size_defaults_to_eval_batch_size_and_can_be_set_alone():
    """train.reference_batch_size sets the reference precompute's batch; unset, eval.batch_size does, as it did
    before the key existed, so old configs keep their cache batches."""
    from dpokit.core.config import config_from_dict, reference_batch_size

    base = {"model": {"name_or_path": "dpokit-tiny-llama"}, "data": {"source": "x.jsonl"}, "eval": {"batch_size": 5}}
    assert reference_batch_size(config_from_dict(base, "t")) == 5
    cfg = config_from_dict({**base, "train": {"reference_batch_size": 32}}, "t")
    assert reference_batch_size(cfg) == 32 and cfg.eval.batch_size == 5


@pytest.mark.parametrize(("old", "layout", "said"), [
    ({"packing": False}, "padded", "train.packing: false is deprecated: write train.layout: padded"),
    ({"packing": True}, "auto", "train.packing: true is deprecated: write train.layout: auto"),
    ({"attention": "flex"}, "flex", "train.attention: flex is deprecated: write train.layout: flex"),
    ({"packing": False, "attention": "dense"}, "padded",
     "train.packing: false and train.attention: dense is deprecated: write train.layout: padded"),
])
def test_old_layout_spellings_still_work_with_one_warning(tmp_path, caplog, old, layout, said):
    """0.1.0's train.packing / train.attention map to train.layout, with one warning line naming the new key."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dpokit"):
        cfg = load_config(write(tmp_path, {**base(tmp_path), "train": old}))
    assert cfg.train.layout == layout and cfg.train.packed == (layout != "padded")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(said), warned


def test_old_and_new_layout_keys_together_is_an_error(tmp_path, cli):
    path = write(tmp_path, {**base(tmp_path), "train": {"packing": False, "layout": "dense"}})
    res = cli("plan", path)
    assert res.returncode == 2 and "keep only train.layout" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "got {" not in res.stderr, res.stderr  # a section's own check names its keys, not the whole section


def test_a_wrong_type_given_as_a_mapping_still_shows_it_and_the_type_hint():
    """Only a section's own check drops the input from its line; a key of the wrong type keeps it and the pointer."""
    with pytest.raises(UserError) as err:
        section_from_dict("train", {"epochs": {"a": 1}})
    assert "train.epochs: Input should be a valid number (got {'a': 1}); see `dpokit config-keys`" in str(err.value)


def test_old_layout_spelling_through_the_cli_warns_on_one_line(tmp_path, cli):
    res = cli("plan", write(tmp_path, {**base(tmp_path), "train": {"packing": False}}))
    assert res.returncode == 0, res.stderr
    assert "train.packing: false is deprecated: write train.layout: padded" in res.stderr
