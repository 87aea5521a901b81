import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import hf_model, save_chatglm, save_hf  # noqa: E402


@pytest.fixture(scope="session")
def models():
    """family -> the transformers model (fp32) that every checkpoint of that family was written from."""
    glm = hf_model("glm", seed=0)
    return {"glm": glm, "glm4": hf_model("glm4", seed=1), "chatglm": glm}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("ckpt")
    out = {"glm": save_hf(models["glm"], root / "glm"),
           "glm4": save_hf(models["glm4"], root / "glm4"),
           "chatglm": save_chatglm(models["chatglm"], root / "chatglm"),
           "glm4-sharded": save_hf(models["glm4"], root / "glm4-sharded", max_shard_size="60KB")}
    (out["glm4"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory, checkpoints):
    """family -> export dir (fp32, opset 23), exported once per session."""
    from trtglm.export.exporter import export

    root = tmp_path_factory.mktemp("export")
    return {fam: root / fam for fam in checkpoints if export(str(checkpoints[fam]), root / fam) is not None}
