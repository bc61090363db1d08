"""Tokenizers: the default model's bytes, byte-level BPE (GPT-2 family) for GGUF models, and an HF checkpoint's own.

``generate`` accepts any tokenizer with ``encode(text) -> list[int]`` and ``decode(ids) -> str``; the classes
here also carry ``bos_id``, ``eos_id``, ``pad_id`` and ``vocab_size``.

``BPETokenizer`` is built with the optional ``tokenizers`` package (and renders chat templates with the
optional ``jinja2``): ``pip install -e '.[demo]'``. ``models.gguf.load_gguf_tokenizer`` builds one from a GGUF
file's vocabulary, merges and chat template. ``load_hf_tokenizer(dir)`` reads an HF checkpoint's tokenizer.json
(with ``tokenizers``, the engine of transformers' fast tokenizers: the same ids) and tokenizer_config.json's
special tokens and chat template.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import warnings
from collections.abc import Sequence

from models.config import _json_object, is_int

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    bos_id, eos_id, pad_id, vocab_size = BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([BOS_ID] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# GGUF ``tokenizer.ggml.pre`` -> whether digits are split one by one before the GPT-2 regex (as llama.cpp
# and the models' own HF tokenizers do: StarCoder's vocabulary, which SmolLM reuses, has no multi-digit tokens).
PRE_TOKENIZERS = {"gpt2": False, "gpt-2": False, "smollm": True, "starcoder": True}  # "gpt-2": llama.cpp's name


class BPETokenizer:
    """Byte-level BPE: the GPT-2 regex (after splitting digits one by one for ``pre`` "smollm" / "starcoder"),
    bytes mapped to the GPT-2 unicode alphabet, then the merges in rank order. ``special_ids`` (control tokens
    such as ``<|im_start|>``) are matched whole in the text, never split, and dropped by ``decode``;
    ``added_ids`` (user-defined tokens such as ``<tool_call>``) are matched whole too but kept by ``decode``.

    tokens: the vocabulary (id -> token string, byte-level alphabet); merges: "left right" pairs in rank order.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], *, pre: str = "gpt2", bos_id: int | None,
                 eos_id: int | None, pad_id: int | None = None, special_ids: Sequence[int] = (),
                 added_ids: Sequence[int] = (), add_bos: bool = False, chat_template: str | None = None):
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError as e:
            raise ImportError("BPETokenizer needs the optional 'tokenizers' package: "
                              "pip install -e '.[demo]' (or bash scripts/setup_env.sh)") from e
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"BPETokenizer: unsupported pre-tokenizer pre={pre!r} (supported: {sorted(PRE_TOKENIZERS)})")
        n = len(tokens)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and (not is_int(value) or not 0 <= value < n):
                raise ValueError(f"BPETokenizer: {name}={value!r} outside the vocabulary [0, {n})")
        if add_bos and bos_id is None:
            raise ValueError("BPETokenizer: add_bos=True needs a bos_id")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != n:
            raise ValueError(f"BPETokenizer: the vocabulary of {n} tokens has {n - len(vocab)} duplicates")
        pairs = []
        for rank, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"BPETokenizer: merge {rank} is {m!r}, expected two tokens separated by one space")
            # checked here: tokenizers raises a bare Exception for the first two, and panics for the merged token
            for t in (*parts, parts[0] + parts[1]):
                if t not in vocab:
                    raise ValueError(f"BPETokenizer: merge {rank} is {m!r}, but {t!r} is not in the vocabulary")
            pairs.append((parts[0], parts[1]))
        tok = Tokenizer(models.BPE(vocab, pairs))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if PRE_TOKENIZERS[pre] else byte_level)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in added_ids])
        self._tok = tok
        self.vocab_size = n
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos
        self.pre = pre
        self.chat_template = chat_template
        self._tokens = list(tokens)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (BOS first when ``add_bos``, default: the model's own setting)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        return ([self.bos_id] if add and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens (BOS, EOS, chat markers) left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
                            tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None) -> str:
        """The prompt text for ``messages`` (dicts with "role" and "content" or "tool_calls", e.g. system then
        user), rendered with the model's Jinja chat template as transformers' ``apply_chat_template`` renders it
        (sandboxed, ``trim_blocks`` and ``lstrip_blocks``; ``bos_token`` / ``eos_token`` defined where the
        tokenizer has them; ``tools`` and ``documents`` None unless given; transformers' ``tojson``,
        ``strftime_now``, ``raise_exception`` and ``{% generation %}``). Needs ``jinja2``.

        Encode the result with ``add_bos=False`` (as transformers does): a template that wants BOS writes it."""
        # an unset token stays undefined (transformers passes only the special tokens that are set)
        special = {name: self._tokens[i] for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                                                         ("pad_token", self.pad_id)) if i is not None}
        return render_chat(self.chat_template, messages, add_generation_prompt, tools, documents, special)


def render_chat(template: str | None, messages: Sequence[dict], add_generation_prompt: bool,
                tools: Sequence[dict] | None, documents: Sequence[dict] | None, special: dict[str, str]) -> str:
    """``messages`` rendered with the Jinja chat ``template`` as transformers renders it (``_chat_environment``),
    the named special tokens ``special`` (e.g. bos_token) defined."""
    if not template:
        raise ValueError("apply_chat_template: this tokenizer has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not {"content", "tool_calls"} & m.keys():
            raise ValueError(f"apply_chat_template: message {i} must be a dict with 'role' and 'content' (or "
                             f"'tool_calls'), got {m!r}")
    return _chat_environment().from_string(template).render(
        messages=list(messages), tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
        **special)


class HFTokenizer:
    """An HF checkpoint's tokenizer (``load_hf_tokenizer``): ``tokenizers.Tokenizer`` of its tokenizer.json, and
    tokenizer_config.json's named special tokens and chat template (or the chat_template.jinja file beside it).

    ``encode(text)`` applies tokenizer.json's post-processor, as transformers' ``tokenizer(text)`` does (e.g. Llama
    3's BOS); ``add_bos=False``: no special tokens added (what ``apply_chat_template(tokenize=True)`` encodes with:
    the template writes its own); ``add_bos=True``: BOS before the text's own ids."""

    def __init__(self, tokenizer, special: dict[str, str], chat_template: str | dict[str, str] | None):
        self._tok = tokenizer
        self.special = special
        # named templates (a list in tokenizer_config.json): "default", and "tool_use" where tools are given
        self._templates = chat_template if isinstance(chat_template, dict) else {"default": chat_template}
        self.chat_template = self._templates.get("default")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (tokenizer.token_to_id(special[name]) if name in special else None
                                                 for name in ("bos_token", "eos_token", "pad_token"))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``: with the post-processor's special tokens (None), none (False), BOS first (True)."""
        ids = self._tok.encode(text, add_special_tokens=add_bos is None).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens left out (transformers' ``decode(ids, skip_special_tokens=True)``)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
                            tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None) -> str:
        """The prompt text for ``messages``, as ``BPETokenizer.apply_chat_template`` (encode it with
        ``add_bos=False``); with ``tools``, the "tool_use" template where the tokenizer has one (as transformers)."""
        template = self._templates.get("tool_use") if tools is not None else None
        return render_chat(template or self.chat_template, messages, add_generation_prompt, tools, documents,
                           self.special)


# transformers' tokenizer classes' defaults for named tokens a file leaves out (given as null: none)
_QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_LLAMA_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
_CLASS_DEFAULTS = {"Qwen2Tokenizer": _QWEN2_DEFAULTS, "Qwen2TokenizerFast": _QWEN2_DEFAULTS,
                   "LlamaTokenizer": _LLAMA_DEFAULTS, "LlamaTokenizerFast": _LLAMA_DEFAULTS}


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def load_hf_tokenizer(path) -> HFTokenizer:
    """The tokenizer of the HF checkpoint directory ``path`` (its tokenizer.json; tokenizer_config.json's special
    tokens and chat template, or chat_template.jinja). Needs ``tokenizers`` (and ``jinja2`` for chat templates).

    As transformers' tokenizer of those files: truncation and padding saved in tokenizer.json are off; the named
    special tokens (bos_token, eos_token, ... and a model's own ``*_token`` keys) come from tokenizer_config.json,
    else special_tokens_map.json, else the defaults of its Qwen2 / Llama tokenizer class, and are matched whole
    (added as special tokens where tokenizer.json does not have them as such); every ``*_token`` is defined in chat
    templates. Not followed: transformers 5's rebuild of a
    ``LlamaTokenizer``'s pre-tokenizer (Llama 2, TinyLlama, CodeLlama: tokenizer.json's SentencePiece-style
    normalizer is replaced by a Metaspace that prepends "▁" to the text only), which changes the ids of text that
    starts with a space or follows a special token: those take tokenizer.json as written (SentencePiece's and
    transformers 4's ids), with a warning."""
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError as e:
        raise ImportError("load_hf_tokenizer needs the optional 'tokenizers' package: "
                          "pip install -e '.[demo]' (or bash scripts/setup_env.sh)") from e
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_hf_tokenizer: {file} not found (only fast tokenizers' tokenizer.json is read)")
    tokenizer = Tokenizer.from_file(file)
    tokenizer.no_truncation()  # transformers sets them per call (off unless asked for)
    tokenizer.no_padding()

    def read_json(name):  # the file's JSON object ({} where there is none); CheckpointError naming a malformed one
        f = os.path.join(path, name)
        return _json_object(f) if os.path.isfile(f) else {}

    config = read_json("tokenizer_config.json")
    legacy_map = read_json("special_tokens_map.json")  # old saves keep the named tokens there
    special = {}
    defaults = {k: v for k, v in _CLASS_DEFAULTS.get(config.get("tokenizer_class"), {}).items()
                if k not in config and k not in legacy_map}
    for source in (config, legacy_map, defaults):
        for name, value in source.items():
            if name.endswith("_token") and name not in special and _token_string(value) is not None:
                special[name] = _token_string(value)
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in dict.fromkeys(special.values()) if t not in added]
    if missing:  # matched whole and dropped by decode, as transformers' named special tokens are
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer",
                                         "CodeLlamaTokenizerFast"):
        spec = json.loads(tokenizer.to_str())
        if not spec.get("pre_tokenizer") and spec.get("normalizer"):  # SentencePiece's layout: "▁" by the normalizer
            warnings.warn(f"load_hf_tokenizer: {path} is a {config['tokenizer_class']} whose tokenizer.json "
                          "normalizes as SentencePiece does; transformers 5 rebuilds its pre-tokenizer (a Metaspace "
                          "that prepends '▁' to the text only), so text that starts with a space or follows a special "
                          "token gets other ids there: these ids follow tokenizer.json (SentencePiece's, "
                          "transformers 4's)", stacklevel=2)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: "default", and "tool_use" for calls with tools
        template = {t["name"]: t["template"] for t in template
                    if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):  # transformers >= 4.43 writes the template there (it wins over the config's)
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return HFTokenizer(tokenizer, special, template if isinstance(template, (str, dict)) else None)


@functools.cache
def _chat_environment():
    """The Jinja environment transformers renders chat templates in (``_compile_jinja_template``)."""
    try:
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need the optional 'jinja2' package: pip install -e '.[demo]'") from e

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (it marks the assistant's tokens for a mask we
        never return): renders the body, in a scope of its own as transformers' call block does."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers': keys in their order, no HTML escaping (jinja2's own sorts keys and escapes <, >, &, ')
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env
