"""Shared fixtures: one tiny-llama base per session (guarded: every test that borrows it must hand it back
unchanged), small experiments, pre-tokenised data, and record-file writers."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

REPO = Path(__file__).resolve().parent.parent


# Tests never write into the checkout: every path that git would list (untracked or ignored, except bytecode
# and the editable install's metadata) is the same after the session as before it.
def _tree_entries() -> set[str] | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all",
                              "--ignored=matching"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (e.g. an sdist): nothing to compare
    return {line for line in out.splitlines()
            if "__pycache__" not in line and ".egg-info" not in line and not line.endswith(".pyc")}


def pytest_sessionstart(session):
    session.config._tree_before = _tree_entries()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_tree_before", None)
    after = _tree_entries() if before is not None else None
    if after is None or not (new := sorted(after - before)):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"FAILED: the test session wrote into the checkout {REPO}: " + ", ".join(new[:10]),
                            red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

# Small everywhere: fast on two loaded CPU cores.
SMALL = {
    "model": {"name": "tiny-llama"},
    "data": {"train": "builtin:train", "train_size": 64, "max_length": 96},
    "lora": {"r": 8, "targets": ["q", "k", "v", "o"]},
    "train": {"steps": 4, "batch_size": 8, "lr": 3e-3, "log_every": 1},
    "eval": {"size": 8, "max_new_tokens": 4, "batch_size": 8, "generate": False},
    "tracking": {"enabled": False},
}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for section, values in b.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture(scope="session")
def small_raw():
    """``small_raw(lora={"r": 4})`` -> the raw mapping of a small tiny-llama experiment."""
    return lambda **sections: _merge(SMALL, sections)


@pytest.fixture(scope="session")
def make_exp(small_raw):
    """``make_exp(lora={"r": 4}, train={"steps": 2})`` -> a validated small tiny-llama Experiment."""
    from lora_ablate.config import build_experiment

    return lambda **sections: build_experiment(small_raw(**sections))


@pytest.fixture(scope="session")
def _tiny_base():
    from lora_ablate.config import ModelConfig
    from lora_ablate.models import load_base

    return load_base(ModelConfig(name="tiny-llama"))


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_base(_tiny_base):
    """The session's tiny-llama LoadedModel. Trials inject LoRA into ``base.model`` and unload it again;
    this fixture fails the test if the base is not handed back exactly as it was lent."""
    before = _snapshot(_tiny_base.model)
    yield _tiny_base
    after = _tiny_base.model.state_dict()
    assert after.keys() == before.keys(), "the shared base has different modules after the test"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the shared base was modified: {changed[:3]}"
    assert not any("lora" in n for n, _ in _tiny_base.model.named_modules()), "LoRA layers left in the base"
    assert not any(p.requires_grad for p in _tiny_base.model.parameters()), "base parameters left trainable"
    assert not _tiny_base.model.training, "base left in training mode"


@pytest.fixture
def fresh_tiny():
    """A new, independent tiny-llama (same weights as the shared base): for stock-peft reloads that
    would otherwise mutate the shared base."""
    from lora_ablate.tiny import tiny_llama

    def make():
        model, _ = tiny_llama()
        return model.eval()

    return make


@pytest.fixture(scope="session")
def train_data(_tiny_base, make_exp):
    from lora_ablate.data import encode_all, load_train

    exp = make_exp()
    return encode_all(load_train(exp.data), _tiny_base.tokenizer, exp.data.template, exp.data.max_length)


@pytest.fixture(scope="session")
def evaluator(_tiny_base, make_exp):
    """NLL-only evaluator on the two built-in held-out sets, 8 examples each."""
    from lora_ablate.data import load_eval_set
    from lora_ablate.evaluation import Evaluator

    exp = make_exp()
    sets = [load_eval_set(name, exp.eval.size, exp.data.seed) for name in exp.eval.sets]
    return Evaluator(sets, _tiny_base.tokenizer, exp.data, exp.eval)


@pytest.fixture
def run_trial(tiny_base, train_data, evaluator, make_exp):
    """``run_trial(lora={...}, train={...}, adapter_dir=None, evaluator=<default>|None, hooks=None)``
    -> TrialResult of one trial on the shared tiny base."""
    from lora_ablate.trainers import make_trainer
    from lora_ablate.trial import TrialSpec

    default_evaluator = evaluator

    def run(lora=None, train=None, adapter_dir=None, evaluator=default_evaluator, hooks=None, data=None):
        exp = make_exp(lora=lora or {}, train=train or {})
        spec = TrialSpec(exp.lora, exp.train, name="test", adapter_dir=adapter_dir)
        return make_trainer(tiny_base, data or train_data, evaluator, hooks, progress=False).train([spec])[0]

    return run


@pytest.fixture
def write_jsonl(tmp_path):
    """``write_jsonl(rows, name="data.jsonl")`` -> path of a JSONL file in tmp_path."""

    def write(rows, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


ALPACA_ROWS = [
    {"instruction": "Reverse the word.", "input": "apple", "output": "elppa"},
    {"instruction": "Write the word in uppercase.", "input": "river", "output": "RIVER"},
    {"instruction": "What is the sum of these numbers?", "input": "2 3", "output": "5"},
    {"instruction": "Answer with yes or no. Is 3 larger than 2?", "input": "", "output": "yes"},
]


@pytest.fixture
def alpaca_rows():
    return copy.deepcopy(ALPACA_ROWS)


@pytest.fixture(scope="session")
def study_exp():
    """``study_exp(settings, space, workspace, **sections)`` -> the base Experiment of a study of ``space``:
    the raw ``settings`` with ``study.workspace`` set and ``sections`` merged over them, layered under the
    space's axes as the ``study`` command does (``spaces.study_experiment``)."""
    from lora_ablate.spaces import study_experiment

    def make(settings: dict, space, workspace, **sections):
        raw = _merge(_merge(settings, {"study": {"workspace": str(workspace)}}), sections)
        return study_experiment(space, None, [], raw)

    return make


@pytest.fixture
def nan_rank(monkeypatch):
    """``nan_rank(module, r)``: the trials of rank ``r`` that ``module.train_one`` trains (``module`` is
    ``lora_ablate.reference``, the single path) get a NaN training loss from now on; returns the unpoisoned
    ``train_one``."""
    from lora_ablate import reference
    from lora_ablate.evaluation import token_nll

    def nan_loss(logits, labels):
        nll, mask = token_nll(logits, labels)
        return nll * float("nan"), mask

    def poison(module, r: int):
        real = module.train_one

        def poisoned(base, spec, *args, **kwargs):
            with monkeypatch.context() as m:
                if spec.lora.r == r:
                    m.setattr(reference, "token_nll", nan_loss)
                return real(base, spec, *args, **kwargs)

        monkeypatch.setattr(module, "train_one", poisoned)
        return real

    return poison


@pytest.fixture(scope="module")
def one_thread():
    """These models are tiny: on a shared small CPU, intra-op threads only contend (8.4 s vs 0.3 s a trial)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny-llama as an HF folder: a k-bit load reads it, and so do its full-precision reload and LoftQ (the
    unquantized weights in its model.safetensors)."""
    from lora_ablate.tiny import tiny_llama

    model, tok = tiny_llama()
    where = tmp_path_factory.mktemp("kbit") / "tiny"
    model.save_pretrained(where)
    tok.save_pretrained(where)
    return where


@pytest.fixture
def cpu_kbit(monkeypatch):
    """bitsandbytes k-bit layers on the CPU (models.load_base refuses them there without the opt-in)."""
    from lora_ablate.models import KBIT_CPU_ENV

    monkeypatch.setenv(KBIT_CPU_ENV, "1")
