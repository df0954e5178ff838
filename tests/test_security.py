"""Security defaults: secrets only from environment variables and never in the run folder or the logs; weights as
safetensors; no remote code unless the config turns it on."""

import pytest
import yaml

from conftest import run_cli, tiny_config
from dpokit.core.config import config_from_dict

SECRET = "hf_dpokitTestSecretValue0123456789"


@pytest.mark.slow
def test_token_env_value_never_reaches_run_folder_or_logs(tmp_path):
    cfg = tiny_config(tmp_path, model={"name_or_path": "dpokit-tiny-llama", "token_env": "DPOKIT_TEST_TOKEN"},
                      train={"max_steps": 2, "save_steps": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("train", path, env={"DPOKIT_TEST_TOKEN": SECRET})
    assert res.returncode == 0, res.stderr[-3000:]
    assert SECRET not in res.stdout and SECRET not in res.stderr
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert (run / "eval.json") in files and any(p.parent.name == "checkpoint-2" for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    assert "token_env: DPOKIT_TEST_TOKEN" in (run / "config.yaml").read_text()
    # Weights are safetensors; no pickles in the final model folder.
    assert (run / "model" / "model.safetensors").is_file()
    assert not list((run / "model").glob("*.bin")) and not list((run / "model").glob("*.pt*"))


def test_token_env_unset_is_a_user_error_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path, model={"name_or_path": "dpokit-tiny-llama", "token_env": "DPOKIT_UNSET_TOKEN_VAR"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("train", path)
    assert res.returncode == 2 and "DPOKIT_UNSET_TOKEN_VAR is not set" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_remote_code_and_pickles_are_off_by_default(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path))
    assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle_weights is False
    assert cfg.model.token_env is None
