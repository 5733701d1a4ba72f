"""A built-in held-out set whose file lives outside the clone says, in one line, what to do."""

import pytest

from lora_ablate import suite
from lora_ablate.data import load_eval_set
from lora_ablate.errors import UserError


def test_a_missing_outside_file_says_how_to_provide_it(tmp_path, monkeypatch):
    real = (suite.evals_dir() / "sets" / "self_instruct_user.yaml").read_text()
    (tmp_path / "evals" / "sets").mkdir(parents=True)
    (tmp_path / "evals" / "sets" / "self_instruct_user.yaml").write_text(real)
    monkeypatch.setattr(suite, "evals_dir", lambda: tmp_path / "evals")
    with pytest.raises(UserError) as e:
        load_eval_set("self_instruct_user", 4, 0)
    text = str(e.value)
    assert len(text.splitlines()) == 1
    assert str(tmp_path.parent / "shared" / "data" / "user_oriented_instructions.jsonl") in text
    assert "github.com/yizhongw/self-instruct" in text and "drop self_instruct_user from eval.sets" in text
