"""Tokenizers: the default model's bytes, byte-level BPE (GPT-2 family) for GGUF models, and an HF checkpoint's own.

``generate`` accepts any tokenizer with ``encode(text) -> list[int]`` and ``decode(ids) -> str``; the classes
here also carry ``bos_id``, ``eos_id``, ``pad_id`` and ``vocab_size``.

``BPETokenizer`` is built with the optional ``tokenizers`` package (and renders chat templates with the
optional ``jinja2``): ``pip install -e '.[demo]'``. ``models.gguf.load_gguf_tokenizer`` builds one from a GGUF
file's vocabulary, merges and chat template. ``load_hf_tokenizer(dir)`` reads an HF checkpoint's tokenizer.json
(with ``tokenizers``, the engine of transformers' fast tokenizers: the same ids; a Llama or Gemma class's rebuilt
as transformers 5 rebuilds it) and tokenizer_config.json's special tokens and chat template.
"""

from __future__ import annotations

import datetime
import functools
import json
import operator
import os
import warnings
from collections.abc import Sequence

from models.config import CheckpointError, _json_object, is_int

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """The default model's tokenizer: ids 0-255 are the UTF-8 bytes, BOS 256, EOS 257, PAD 258 (vocabulary 259).
    ``encode(text, add_bos=True)``; ``decode(ids)`` drops ids that are not bytes."""

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
    ``added_ids`` (user-defined tokens such as ``<tool_call>``: plain text, not byte-level) are matched whole too
    and written as they are by ``decode``;
    ``unused_ids`` (placeholders such as ``<unused0>``) are not matched and dropped by ``decode`` (llama.cpp's BPE
    decoding writes nothing for them).

    tokens: the vocabulary (id -> token string, byte-level alphabet); merges: "left right" pairs in rank order.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], *, pre: str = "gpt2", bos_id: int | None,
                 eos_id: int | None, pad_id: int | None = None, special_ids: Sequence[int] = (),
                 added_ids: Sequence[int] = (), unused_ids: Sequence[int] = (), add_bos: bool = False,
                 add_eos: bool = False,
                 chat_template: str | None = None):
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
        if add_eos and eos_id is None:
            raise ValueError("BPETokenizer: add_eos=True needs an eos_id")
        for name, ids in (("special_ids", special_ids), ("added_ids", added_ids), ("unused_ids", unused_ids)):
            bad = [i for i in ids if not is_int(i) or not 0 <= i < n]  # -1 read the last token, quietly
            if bad:
                raise ValueError(f"BPETokenizer: {name} holds {bad[0]!r}, outside the vocabulary [0, {n})")
        kinds = [set(map(int, ids)) for ids in (special_ids, added_ids, unused_ids)]
        if both := (kinds[0] & kinds[1]) | (kinds[0] & kinds[2]) | (kinds[1] & kinds[2]):
            raise ValueError(f"BPETokenizer: token {min(both)} is in two of special_ids, added_ids and unused_ids; "
                             "each token has one kind")
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
        self.add_bos, self.add_eos = add_bos, add_eos
        self.pre = pre
        self.chat_template = chat_template
        self._tokens = list(tokens)
        self._unused = frozenset(int(i) for i in unused_ids)
        self._added = frozenset(int(i) for i in added_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``: BOS first when ``add_bos``; None (default): the model's own special tokens, BOS
        first and EOS last where its settings add them (llama.cpp's ``add_special``); False: none."""
        ids = _ids(self._tok, text, special=False)
        add = self.add_bos if add_bos is None else add_bos
        eos = [self.eos_id] if add_bos is None and self.add_eos else []
        return ([self.bos_id] if add and self.bos_id is not None else []) + ids + eos

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens (BOS, EOS, chat markers) and unused ones left out; ``ValueError`` for an id
        that is not an integer in ``[0, vocab_size)`` (tokenizers dropped one past the vocabulary and raised
        OverflowError for -1)."""
        out = []
        for x in ids:
            try:
                i = operator.index(x)  # numpy / jax integers too; not floats
            except TypeError:
                i = None
            if i is None or not 0 <= i < self.vocab_size:
                raise ValueError(f"BPETokenizer.decode: ids must be integer token ids in [0, {self.vocab_size}), "
                                 f"got {x if i is None else i!r}")
            out.append(i)
        # A user-defined token's text is written as it is (llama.cpp's token_to_piece): it is plain text, not in
        # the byte-level alphabet, which tokenizers' decoder would read "ñ" of as the byte 0xF1.
        text, run = [], []
        for i in out:
            if i in self._added:
                text += [self._tok.decode(run, skip_special_tokens=True), self._tokens[i]]
                run = []
            elif i not in self._unused:
                run.append(i)
        return "".join(text + [self._tok.decode(run, skip_special_tokens=True)])

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
    the named special tokens ``special`` (e.g. bos_token) defined. ValueError for no messages (as transformers) and
    for a message that is not a dict with "role" and "content" or "tool_calls" (transformers renders what the
    template makes of the missing keys, e.g. an empty role: a malformed prompt)."""
    if not template:
        raise ValueError("apply_chat_template: this tokenizer has no chat template")
    if isinstance(messages, (str, bytes, dict)):  # (a string was read as its characters, each a "message")
        raise ValueError(f"apply_chat_template: messages must be a list of message dicts ([{{'role': 'user', "
                         f"'content': ...}}]), got {type(messages).__name__} {str(messages)[:40]!r}")
    messages = list(messages)
    if not messages:
        raise ValueError("apply_chat_template: no messages (an empty conversation); give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not {"content", "tool_calls"} & m.keys():
            raise ValueError(f"apply_chat_template: message {i} must be a dict with 'role' and 'content' (or "
                             f"'tool_calls'), got {m!r}")
    return _chat_environment().from_string(template).render(
        messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
        **special)


# transformers' clean_up_tokenization, in its order
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class HFTokenizer:
    """An HF checkpoint's tokenizer (``load_hf_tokenizer``): ``tokenizers.Tokenizer`` of its tokenizer.json, and
    tokenizer_config.json's named special tokens and chat template (or the chat_template.jinja file beside it).

    ``encode(text)`` applies tokenizer.json's post-processor, as transformers' ``tokenizer(text)`` does (e.g. Llama
    3's BOS); ``add_bos=False``: no special tokens added (what ``apply_chat_template(tokenize=True)`` encodes with:
    the template writes its own); ``add_bos=True``: BOS before the text's own ids. A CodeLlama tokenizer encodes a
    text that holds its fill token in the infilling format (``_Infilling``)."""

    def __init__(self, tokenizer, special: dict[str, str], chat_template: str | dict[str, str] | None,
                 infilling: _Infilling | None = None, clean_up: bool = False):
        self._tok = tokenizer
        self.clean_up = clean_up
        self.special = special
        # named templates (a list in tokenizer_config.json): "default", and "tool_use" where tools are given
        self._templates = chat_template if isinstance(chat_template, dict) else {"default": chat_template}
        self.chat_template = self._templates.get("default")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (tokenizer.token_to_id(special[name]) if name in special else None
                                                 for name in ("bos_token", "eos_token", "pad_token"))
        self._infilling = infilling

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``: with the post-processor's special tokens (None), none (False), BOS first (True)."""
        if self._infilling is not None and self._infilling.fill in text:
            before, after = text.split(self._infilling.fill)  # a second fill token: ValueError, as in transformers
            if after:
                bos = [self.bos_id] if add_bos is not False and self.bos_id is not None else []
                return bos + self._infilling.encode(before, after)
            text = before  # nothing after it: the text before it, as usual
        ids = _ids(self._tok, text, special=add_bos is None)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens left out (transformers' ``decode(ids, skip_special_tokens=True)``); spaces
        before punctuation and English contractions removed where ``clean_up`` (tokenizer_config.json's
        ``clean_up_tokenization_spaces`` on a model that is not BPE: transformers' ``clean_up_tokenization``)."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
                            tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None) -> str:
        """The prompt text for ``messages``, as ``BPETokenizer.apply_chat_template`` (encode it with
        ``add_bos=False``); with ``tools``, the "tool_use" template where the tokenizer has one (as transformers)."""
        template = self._templates.get("tool_use") if tools is not None else None
        return render_chat(template or self.chat_template, messages, add_generation_prompt, tools, documents,
                           self.special)


def _ids(tok, text: str, special: bool) -> list[int]:
    """``tok.encode(text).ids``, with or without the post-processor's special tokens. tokenizers raises a bare
    Exception where it fails on a text, e.g. on a piece in neither the vocabulary nor its byte tokens when the unk
    token is missing from the vocabulary (so does transformers' tokenizer of the same files): a ValueError naming
    the text (its other errors, a TypeError for a text that is no string, pass as they are)."""
    try:
        return tok.encode(text, add_special_tokens=special).ids
    except Exception as e:  # noqa: BLE001 (tokenizers' own errors are bare Exceptions)
        if type(e) is not Exception:
            raise
        raise ValueError(f"encode: the tokenizer cannot encode {text[:60]!r} ({e}; a piece in neither the vocabulary "
                         "nor its byte tokens fails so where the unk token is not in the vocabulary)") from e


class _Infilling:
    """transformers' ``CodeLlamaTokenizer`` on a text that holds its fill token (``_encode_plus`` and
    ``set_infilling_processor``, models/code_llama/tokenization_code_llama.py): the text before the fill token and the
    text after it take the infilling format ``▁<PRE> {" " + before} ▁<SUF> {after} ▁<MID>`` (BOS first where special
    tokens are added; prefix, suffix and middle tokens either way), each part encoded by the tokenizer with a
    normalizer that writes spaces as "▁". ``ids``: the prefix, suffix and middle ids (None: the tokenizer has none,
    a ValueError as in transformers).

    transformers' tokenizer then resets its normalizer to SentencePiece's (Prepend "▁" + Replace), not to none: its
    later ids of text that starts with a space or follows a special token are tokenizer.json's, where these stay a
    fresh tokenizer's (a warning says so)."""

    def __init__(self, tokenizer, fill: str, ids: tuple[int | None, int | None, int | None]):
        from tokenizers import Tokenizer, normalizers

        self.fill, self.ids = fill, ids
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.normalizer = normalizers.Replace(" ", "\u2581")

    def encode(self, before: str, after: str) -> list[int]:
        if None in self.ids:
            raise ValueError(f"encode: the text holds the fill token {self.fill!r}, but this tokenizer has no "
                             f"prefix, suffix or middle token for infilling (ids {self.ids})")
        warnings.warn("encode: after an infilling text, transformers' CodeLlamaTokenizer keeps SentencePiece's "
                      "normalizer, so its later ids of text after a space or a special token differ from these "
                      "(those of a fresh tokenizer)", stacklevel=3)
        prefix, suffix, middle = self.ids
        return [prefix, *_ids(self._tok, " " + before, special=False), suffix,
                *_ids(self._tok, after, special=False), middle]


# transformers' tokenizer classes' defaults for named tokens a file leaves out (given as null: none)
_QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_LLAMA_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
# CodeLlamaTokenizer's infilling tokens: its __init__ arguments, named tokens and default extra special tokens
_CODE_LLAMA_TOKENS = {"prefix_token": "▁<PRE>", "middle_token": "▁<MID>", "suffix_token": "▁<SUF>",
                      "eot_token": "▁<EOT>", "fill_token": "<FILL_ME>"}
# GemmaTokenizer's named tokens (its __init__ arguments: "<mask>" too, added where the vocabulary lacks it)
_GEMMA_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                   "mask_token": "<mask>"}
# GPT2Tokenizer's (no pad token: tokenizer.json's padding gives none either)
_GPT2_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "pad_token": None}
_CLASS_DEFAULTS = {"Qwen2Tokenizer": _QWEN2_DEFAULTS, "LlamaTokenizer": _LLAMA_DEFAULTS,
                   "CodeLlamaTokenizer": {**_LLAMA_DEFAULTS, **_CODE_LLAMA_TOKENS}, "GemmaTokenizer": _GEMMA_DEFAULTS,
                   "GPT2Tokenizer": _GPT2_DEFAULTS}
# transformers' standard named tokens, in the order its tokenizers add those they lack (then a model's own)
_STANDARD_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# AutoTokenizer (models/auto/tokenization_auto.py) for models.config.FAMILIES' model types: the tokenizer class
# registered for config.json's model_type (none for llama and smollm3), and the model types whose files it holds to
# name a wrong class (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
_REGISTERED_CLASSES = {"mistral": "TokenizersBackend", "mixtral": "TokenizersBackend", "granite": "TokenizersBackend",
                       "olmo2": "TokenizersBackend", "phi3": "TokenizersBackend", "qwen2": "Qwen2Tokenizer",
                       "qwen3": "Qwen2Tokenizer", "gemma": "GemmaTokenizer"}
_WRONG_ON_HUB = {"qwen2", "phi3"}
_LLAMA_CLASSES = ("LlamaTokenizer", "CodeLlamaTokenizer")  # transformers 5 rebuilds their tokenizer.json


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _named_tokens(config: dict, legacy_map: dict, defaults: dict, padding: dict, config_file: str) -> dict:
    """The named special tokens as transformers 5 reads them (``_from_pretrained``): name -> its value in the files (a
    string or an AddedToken's dict), the first given of: special_tokens_map.json's standard names (``_STANDARD_NAMES``)
    and the names of its ``extra_special_tokens`` object (where ``legacy_map`` is read); tokenizer_config.json's
    (``config``) ``*_token`` keys and the names of its ``extra_special_tokens`` object (over those keys), a model's
    own key only where it gives a string; special_tokens_map.json's other ``*_token`` keys; tokenizer_config.json's
    own keys given null or a dict; the tokenizer class's ``defaults``; tokenizer.json's ``padding`` pad token. One
    given as null is none. In tokenizer_config.json a dict is an AddedToken only with "__type": "AddedToken"
    (``_typed_token``); anything else but a string or null is a CheckpointError naming the key for a standard name or
    an extra_special_tokens name (transformers raises a TypeError), no named token for a model's own ``*_token`` key
    (transformers ignores it)."""
    legacy_extra, config_extra = (s.get("extra_special_tokens") for s in (legacy_map, config))
    legacy_extra, config_extra = (x if isinstance(x, dict) else {} for x in (legacy_extra, config_extra))
    own = {k: v for k, v in config.items() if k.endswith("_token")}
    # a model's own name given as null or a dict yields to special_tokens_map.json's
    later = {k: v for k, v in own.items() if k not in _STANDARD_NAMES and k not in config_extra and
             not isinstance(v, str)}
    entries = [(k, v, None) for k, v in legacy_map.items() if k in _STANDARD_NAMES]
    entries += [(k, v, None) for k, v in legacy_extra.items()]
    entries += [(k, v, "extra_special_tokens" if k in config_extra else k) for k, v in {**own, **config_extra}.items()
                if k not in later]
    entries += [(k, v, None) for k, v in legacy_map.items() if k.endswith("_token")]
    entries += [(k, v, k) for k, v in later.items()]
    entries += [(k, v, None) for source in (defaults, padding) for k, v in source.items()]
    raw, given = {}, set()
    for name, value, key in entries:  # key: tokenizer_config.json's key that gives it (None: another file's)
        if name in given:
            continue
        if key is not None and not (value is None or isinstance(value, str) or _typed_token(value)):
            if name in _STANDARD_NAMES or key == "extra_special_tokens":
                where = key if key == name else f"{key}'s {name}"
                raise CheckpointError(f"{config_file}: {where} must be a string, null or an AddedToken object "
                                      f'({{"__type": "AddedToken", "content": ...}}), got {value!r} (transformers 5 '
                                      "raises a TypeError)")
            continue
        given.add(name)  # given as null: none
        if _token_string(value) is not None:
            raw[name] = value
    return raw


def _auto_class(named, model_type) -> str | None:
    """The tokenizer class transformers' AutoTokenizer builds where the files name the class ``named`` (without
    "Fast": transformers 5 has one class for both) and config.json the ``model_type``. Only a Llama class is
    routed: config.json's model_type overrides it where a class other than the named one is registered for it, with
    TokenizersBackend (tokenizer.json as written: the files' class is not built), or with its own class where the
    files' is held wrong (qwen2); any other class is taken as named. Files that name no class take the class
    registered for the model_type (GemmaTokenizer for Gemma's files without tokenizer_class; Qwen2Tokenizer, its
    defaults included, for qwen2 / qwen3), None where none is."""
    named = named.removesuffix("Fast") if isinstance(named, str) else None
    registered = _REGISTERED_CLASSES.get(model_type)
    if named is None:
        return registered
    if named not in _LLAMA_CLASSES or registered is None:
        return named
    if registered == "TokenizersBackend":
        return registered
    return registered if model_type in _WRONG_ON_HUB else named


def _sentencepiece_layout(spec: dict) -> bool:
    """Whether tokenizer.json is a SentencePiece-style BPE: words marked by "▁", from a Metaspace pre-tokenizer or
    from a Prepend / Replace normalizer (Llama 2's)."""
    if (spec.get("model") or {}).get("type") != "BPE":
        return False
    steps = []
    for key, items in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
        step = spec.get(key) or {}
        steps += step.get(items) or [step]
    return any(s.get("type") == "Metaspace" or (s.get("type") == "Prepend" and s.get("prepend") == "\u2581") or
               (s.get("type") == "Replace" and s.get("content") == "\u2581") for s in steps)


def _code_llama_arguments(config: dict, legacy_map: dict) -> dict:
    """CodeLlamaTokenizer's infilling arguments (``_CODE_LLAMA_TOKENS``) as transformers' ``_from_pretrained`` passes
    them: special_tokens_map.json's where it is read; tokenizer_config.json's null or AddedToken dict; a string there
    is made a named token instead, which leaves the argument its default."""
    return {k: legacy_map[k] if k in legacy_map else config[k] if k in config and not isinstance(config[k], str)
            else default for k, default in _CODE_LLAMA_TOKENS.items()}


def _byte_fallback_bpe(spec: dict, unk_token: str | None):
    """A ``tokenizers.Tokenizer`` of tokenizer.json ``spec``'s vocabulary and merges as transformers 5's
    SentencePiece-style classes (Llama, CodeLlama, Gemma) rebuild it: BPE with ``fuse_unk`` and ``byte_fallback``,
    no dropout, ``unk_token`` where the class passes one (None: none)."""
    from tokenizers import Tokenizer, models

    model = spec["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    unk = {} if unk_token is None else {"unk_token": unk_token}
    return Tokenizer(models.BPE(vocab=model["vocab"], merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                                **unk))


def _sentencepiece_decoding() -> list:
    """The decoder steps those classes share: "▁" as " ", byte fallback, fuse."""
    from tokenizers import decoders

    return [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]


def _llama_tokenizer(spec: dict, post_processor, config: dict, legacy_map: dict, raw: dict, code_llama: bool,
                     config_file: str):
    """The ``tokenizers.Tokenizer`` that transformers 5's ``LlamaTokenizer`` (``CodeLlamaTokenizer`` where
    ``code_llama``) builds from tokenizer.json ``spec``. Its ``__init__`` (models/llama/tokenization_llama.py,
    models/code_llama/tokenization_code_llama.py) keeps only tokenizer.json's vocabulary and merges
    (``TokenizersBackend.convert_to_native_format``; also its post-processor, ``post_processor``) and sets
    - the model: BPE with ``fuse_unk`` and ``byte_fallback``, no dropout, no unk_token (CodeLlama: its unk_token);
    - no normalizer; the pre-tokenizer Metaspace("▁", split=False) with prepend_scheme "first" (a "▁" before the
      text, none after a special token) where ``add_prefix_space`` (default true) and not ``legacy`` (default false;
      CodeLlama ignores it), "always" (after special tokens too) where ``add_prefix_space`` and ``legacy``, "never"
      where not ``add_prefix_space``. Either scheme adds no "▁" before a piece that starts with a space: " Hello" is
      "▁Hello" where SentencePiece's normalizer (Prepend "▁" + Replace) makes it "▁▁Hello";
    - the decoder: "▁" as " ", byte fallback, fuse, one leading space stripped where ``add_prefix_space`` (always for
      CodeLlama);
    - tokenizer.json's post-processor; CodeLlama builds its own (BOS, no EOS): with a tokenizer.json, transformers
      drops tokenizer_config.json's ``add_bos_token`` / ``add_eos_token``, and CodeLlama's argument is true;
    - the added tokens of ``_added_tokens``."""
    from tokenizers import decoders, pre_tokenizers, processors

    special = {name: _token_string(value) for name, value in raw.items()}
    # str(): as CodeLlama's __init__
    tokenizer = _byte_fallback_bpe(spec, str(special.get("unk_token")) if code_llama else None)
    prefix_space = config.get("add_prefix_space")
    prefix_space = True if prefix_space is None else bool(prefix_space)
    if not prefix_space:
        scheme = "never"
    else:
        scheme = "always" if config.get("legacy", False) and not code_llama else "first"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    strip = prefix_space or code_llama
    tokenizer.decoder = decoders.Sequence(_sentencepiece_decoding() + ([decoders.Strip(" ", 1, 0)] if strip else []))
    tokenizer.add_tokens(_added_tokens(_spec_added_tokens(spec), config, legacy_map, raw, config_file, code_llama))

    bos = special.get("bos_token")
    if not code_llama:
        tokenizer.post_processor = post_processor
    elif bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def _spec_added_tokens(spec: dict) -> dict:
    """tokenizer.json ``spec``'s added tokens, ``{id: tokenizers.AddedToken}``."""
    from tokenizers import AddedToken

    return {t["id"]: AddedToken(**{k: v for k, v in t.items() if k != "id"}) for t in spec["added_tokens"]}


def _typed_token(value) -> bool:
    """Whether ``value`` is an AddedToken as tokenizer_config.json writes one: {"__type": "AddedToken", "content": ...}
    (transformers reads a dict there as an AddedToken only so)."""
    return isinstance(value, dict) and value.get("__type") == "AddedToken" and isinstance(value.get("content"), str)


def _added_token(value, special: bool | None = True):
    """The ``tokenizers.AddedToken`` transformers makes of a token in the files: a string (special, not normalized), or
    an AddedToken's dict with its flags, made special (``special`` True) or as the dict says (None)."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    fields = {k: v for k, v in value.items() if k != "__type"}
    return AddedToken(**(fields if special is None else {**fields, "special": special}))


def _extra_special_tokens(config: dict, legacy_map: dict, config_file: str, code_llama: bool = False) -> list:
    """The extra special tokens as transformers 5 reads them (``_from_pretrained``, ``PreTrainedTokenizerBase.
    __init__``), AddedTokens: tokenizer_config.json's extra_special_tokens (else additional_special_tokens; strings,
    or AddedToken dicts special only where they say so; an object there holds named tokens, not these) with
    special_tokens_map.json's extra_special_tokens (strings or dicts, special); where neither file has those, its
    additional_special_tokens (strings), to which CodeLlama appends its infilling arguments. An entry transformers 5
    fails on (its TypeError: a dict without "__type" in tokenizer_config.json, any dict in additional_special_tokens of
    special_tokens_map.json) is a CheckpointError naming the file and key."""
    legacy_file = os.path.join(os.path.dirname(config_file), "special_tokens_map.json")

    def tokens(file, source, key, dicts):  # dicts: "typed" (with "__type"), "any" or "none" (strings only)
        values = source.get(key) if isinstance(source.get(key), list) else []
        for v in values:
            as_dict = {"typed": _typed_token(v), "none": False,
                       "any": isinstance(v, dict) and isinstance(v.get("content"), str) and "special" not in v}[dicts]
            if not isinstance(v, str) and not as_dict:
                kind = {"typed": ' or an AddedToken object ({"__type": "AddedToken", "content": ...})',
                        "any": ' or an AddedToken object ({"content": ...}, no "special")', "none": ""}[dicts]
                raise CheckpointError(f"{file}: {key} holds {v!r}, which transformers 5 cannot read (a TypeError); "
                                      f"expected a string{kind}")
        return [_added_token(v, None if dicts == "typed" else True) for v in values]

    key = "extra_special_tokens" if "extra_special_tokens" in config else "additional_special_tokens"
    extra = tokens(config_file, config, key, "typed")
    extra += tokens(legacy_file, legacy_map, "extra_special_tokens", "any")
    if key in config and not isinstance(config[key], dict) or isinstance(legacy_map.get("extra_special_tokens"), list):
        return extra  # (an extra_special_tokens object, named tokens, leaves the list unset)
    extra = tokens(legacy_file, legacy_map, "additional_special_tokens", "none")
    if code_llama:
        extra += [_added_token(v) for v in _code_llama_arguments(config, legacy_map).values() if v is not None]
    return extra


def _added_tokens(file_tokens: dict, config: dict, legacy_map: dict, raw: dict, config_file: str,
                  code_llama: bool = False, present: Sequence[str] = ()) -> list:
    """The tokens transformers 5's ``TokenizersBackend.__init__`` adds to the tokenizer it builds (whose added tokens
    are ``present``: tokenizer.json's where it reads the file as written, none where it rebuilds it): all of
    tokenizer_config.json's added_tokens_decoder (else ``file_tokens``, tokenizer.json's ``{id: AddedToken}``), again,
    with their flags, in id order (a token new to the tokenizer takes the next id, whatever id the file gives it), then
    the named tokens (``raw``: their values in the files; for CodeLlama its infilling tokens among them) and extra
    special tokens (``_extra_special_tokens``) not among those, with their flags; a named token made special.
    ``config_file``: the path of tokenizer_config.json (``config``), named in errors."""
    from tokenizers import AddedToken

    if "added_tokens_decoder" in config:
        entries = config["added_tokens_decoder"]
        try:
            decoder = {int(i): AddedToken(**t) for i, t in entries.items()}
        except (AttributeError, TypeError, ValueError) as e:  # a list, a non-integer id, an entry that is no object
            raise CheckpointError(f"{config_file}: added_tokens_decoder must map token ids (\"32000\") to "
                                  f"AddedToken objects (content, special, ...); got {str(entries)[:120]} ({e})") from e
    else:
        decoder = file_tokens
    tokens = [decoder[i] for i in sorted(decoder)]
    known = {*present, *(t.content for t in tokens)}
    order = dict.fromkeys([*_STANDARD_NAMES, *(_CODE_LLAMA_TOKENS if code_llama else ()), *raw])
    named = [_added_token(raw[name]) for name in order if name in raw]
    for t in named + _extra_special_tokens(config, legacy_map, config_file, code_llama):
        if t.content not in known and t not in tokens:  # (AddedTokens are equal with equal flags: of two tokens
            tokens.append(t)                              # of one content, tokenizers keeps the last's flags)
    names = {t.content for t in named}
    for t in tokens:
        t.special = t.special or t.content in names
    return tokens


def _gemma_tokenizer(spec: dict, post_processor, config: dict, legacy_map: dict, raw: dict, config_file: str):
    """The ``tokenizers.Tokenizer`` that transformers 5's ``GemmaTokenizer`` (models/gemma/tokenization_gemma.py)
    builds from tokenizer.json ``spec``: as for a LlamaTokenizer, only tokenizer.json's vocabulary, merges and
    post-processor are kept, and its ``__init__`` sets
    - the model: BPE with ``fuse_unk`` and ``byte_fallback``, no dropout, unk_token ``str(unk_token)``;
    - the normalizer Replace(" ", "▁") and the pre-tokenizer Split(" ", merged_with_previous) (which finds no space
      left: the layout of Gemma's own tokenizer.json, where no "▁" is prepended);
    - the decoder: "▁" as " ", byte fallback, fuse (no space stripped);
    - tokenizer.json's post-processor (tokenizer_config.json's ``add_bos_token`` / ``add_eos_token`` are dropped
      where there is a tokenizer.json); none where it has none (no BOS);
    - the added tokens of ``_added_tokens``, its named tokens' defaults ``<mask>`` included (``_GEMMA_DEFAULTS``)."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer = _byte_fallback_bpe(spec, str(_token_string(raw.get("unk_token"))))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence(_sentencepiece_decoding())
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.add_tokens(_added_tokens(_spec_added_tokens(spec), config, legacy_map, raw, config_file))
    tokenizer.post_processor = post_processor
    return tokenizer


def _warn_rebuilds(path: str, tokenizer_class: str | None, tokenizer, config: dict) -> None:
    """Warnings where transformers 5 builds the files' tokenizer otherwise than tokenizer.json says and the loader
    does not follow (its ids follow tokenizer.json): a GPT2Tokenizer (rebuilt from the vocabulary and merges under
    GPT-2's ByteLevel pre-tokenizer, no normalizer) or a Qwen2Tokenizer (NFC and ``add_prefix_space``) whose
    tokenizer.json is not that; ``split_special_tokens`` (transformers then encodes special-token text as text)."""
    spec = json.loads(tokenizer.to_str()) if tokenizer_class in ("GPT2Tokenizer", "Qwen2Tokenizer") else {}
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}  # (the whole file: read where needed)
    prefix_space = bool(config.get("add_prefix_space"))
    differs = None
    if tokenizer_class == "GPT2Tokenizer" and (normalizer is not None or pre.get("type") != "ByteLevel" or
                                               bool(pre.get("add_prefix_space")) != prefix_space or
                                               not pre.get("use_regex", True)):
        differs = "rebuilds a GPT2Tokenizer from its vocabulary and merges under GPT-2's ByteLevel pre-tokenizer " \
                  "alone (no normalizer, digit or other splits)"
    elif tokenizer_class == "Qwen2Tokenizer" and ((normalizer or {}).get("type") != "NFC" or prefix_space):
        differs = "rebuilds a Qwen2Tokenizer from its vocabulary and merges, with NFC and add_prefix_space " \
                  f"{prefix_space}"
    if differs:
        warnings.warn(f"load_hf_tokenizer: for {path} transformers 5 {differs}, which this tokenizer.json is not: "
                      "these ids follow tokenizer.json and may differ from transformers'", stacklevel=3)
    if config.get("split_special_tokens"):
        warnings.warn(f"load_hf_tokenizer: {path} sets split_special_tokens (transformers then encodes a special "
                      "token's text as plain text): not followed, special tokens are matched whole", stacklevel=3)


def load_hf_tokenizer(path) -> HFTokenizer:
    """The tokenizer of the HF checkpoint directory ``path`` (its tokenizer.json; tokenizer_config.json's special
    tokens and chat template, or chat_template.jinja). Needs ``tokenizers`` (and ``jinja2`` for chat templates).

    As transformers' tokenizer of those files: truncation and padding saved in tokenizer.json are off; the named
    special tokens (bos_token, eos_token, ... and a model's own ``*_token`` keys) come from tokenizer_config.json and,
    where it has no added_tokens_decoder (old saves), special_tokens_map.json (whose bos_token, eos_token, ... win),
    else the defaults of its Qwen2 / Llama / CodeLlama / Gemma / GPT-2 tokenizer class, else tokenizer.json's padding
    (``_named_tokens``); tokenizer_config.json's added_tokens_decoder (its flags), then the named and extra special
    tokens tokenizer.json lacks, are added as transformers 5 adds them (``_added_tokens``: matched whole, the named
    ones special); every ``*_token`` is defined in chat templates; ``clean_up_tokenization_spaces`` cleans decoded
    text of a model that is not BPE.

    A ``LlamaTokenizer`` / ``CodeLlamaTokenizer`` (Llama 2, TinyLlama, CodeLlama) is rebuilt as transformers 5
    rebuilds it (``_llama_tokenizer``: tokenizer.json's vocabulary and merges under a Metaspace pre-tokenizer, which
    gives other ids than SentencePiece's normalizer for text that starts with a space or follows a special token),
    unless config.json's model_type makes AutoTokenizer read tokenizer.json as written (mistral, mixtral, granite,
    olmo2, phi3: Mistral 7B's and Phi-3's files name a LlamaTokenizer). A ``GemmaTokenizer`` (Gemma 1 / 1.1, CodeGemma;
    also for model_type gemma where the files name no class) is rebuilt as transformers 5 builds it
    (``_gemma_tokenizer``: its own normalizer and decoder over tokenizer.json's vocabulary, merges and
    post-processor; the added tokens of tokenizer_config.json's added_tokens_decoder; "<mask>" among its default
    named tokens). Not followed, with a warning: the Gemma rebuild of a tokenizer.json that is not a BPE (a WordLevel
    one: transformers 5 spells its words letter by letter), the Llama rebuild of a tokenizer.json that is not a
    SentencePiece-style BPE (byte-level: transformers 5's ids lose the spaces there), a Llama class with
    model_type qwen2 (transformers builds a Qwen2Tokenizer), and the GPT2Tokenizer / Qwen2Tokenizer rebuilds where
    tokenizer.json is not what they make (``_warn_rebuilds``: SmolLM2's files name GPT2Tokenizer, whose rebuild drops
    their digit splits); those ids are tokenizer.json's. Chat templates: tokenizer_config.json's, or the files that
    win over it, chat_template.jinja ("default") and transformers 5's additional_chat_templates/NAME.jinja."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("load_hf_tokenizer needs the optional 'tokenizers' package: "
                          "pip install -e '.[demo]' (or bash scripts/setup_env.sh)") from e
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_hf_tokenizer: {file} not found (only fast tokenizers' tokenizer.json is read)")
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception, without the path (a truncated download, say)
        raise CheckpointError(f"{file}: not a readable tokenizer.json ({e})") from e
    # its padding's pad token is transformers' pad_token where no file and no class argument gives one
    padding = {"pad_token": tokenizer.padding["pad_token"]} if tokenizer.padding else {}
    tokenizer.no_truncation()  # transformers sets them per call (off unless asked for)
    tokenizer.no_padding()

    def read_json(name):  # the file's JSON object ({} where there is none); CheckpointError naming a malformed one
        f = os.path.join(path, name)  # (a directory of that name is refused by _json_object, not taken for none)
        return _json_object(f) if os.path.exists(f) else {}

    config_file = os.path.join(path, "tokenizer_config.json")
    config = read_json("tokenizer_config.json")
    model_config = read_json("config.json")  # its model_type can override the tokenizer class (_auto_class)
    named_class = config.get("tokenizer_class") or model_config.get("tokenizer_class")
    tokenizer_class = _auto_class(named_class, model_config.get("model_type"))
    # old saves keep the named tokens in special_tokens_map.json: transformers reads it only where
    # tokenizer_config.json has no added_tokens_decoder
    legacy_map = {} if "added_tokens_decoder" in config else read_json("special_tokens_map.json")
    raw = _named_tokens(config, legacy_map, _CLASS_DEFAULTS.get(tokenizer_class, {}), padding, config_file)
    special = {name: _token_string(value) for name, value in raw.items()}
    infilling = None
    spec = json.loads(tokenizer.to_str()) if tokenizer_class in (*_LLAMA_CLASSES, "GemmaTokenizer") else None
    if tokenizer_class == "GemmaTokenizer" and (spec["model"] or {}).get("type") == "BPE":
        tokenizer = _gemma_tokenizer(spec, tokenizer.post_processor, config, legacy_map, raw, config_file)
    elif spec is not None and tokenizer_class != "GemmaTokenizer" and _sentencepiece_layout(spec):
        code_llama = tokenizer_class == "CodeLlamaTokenizer"
        tokenizer = _llama_tokenizer(spec, tokenizer.post_processor, config, legacy_map, raw, code_llama,
                                     config_file)
        if code_llama:  # its fill token is its argument's (set last in its __init__); so are the infilling ids
            args = {k: _token_string(v) for k, v in _code_llama_arguments(config, legacy_map).items()}
            unk = tokenizer.token_to_id(special["unk_token"]) if "unk_token" in special else None

            def token_id(token):  # as transformers' convert_tokens_to_ids: the unk id for a token it lacks
                i = None if token is None else tokenizer.token_to_id(token)
                return unk if token is not None and i is None else i

            special.pop("fill_token", None)
            if args["fill_token"] is not None:
                special["fill_token"] = args["fill_token"]
                ids = tuple(token_id(args[k]) for k in ("prefix_token", "suffix_token", "middle_token"))
                infilling = _Infilling(tokenizer, args["fill_token"], ids)
    else:
        if tokenizer_class == "GemmaTokenizer":  # transformers 5 builds a BPE over a vocabulary that is not one
            warnings.warn(f"load_hf_tokenizer: {path} is a GemmaTokenizer whose tokenizer.json is not a BPE; "
                          "transformers 5 rebuilds it as one from its vocabulary: these ids follow tokenizer.json",
                          stacklevel=2)
        elif spec is not None:  # a Llama class, not in SentencePiece's layout
            warnings.warn(f"load_hf_tokenizer: {path} is a {tokenizer_class} whose tokenizer.json is not a "
                          "SentencePiece-style BPE; transformers 5 rebuilds it as one (a Metaspace pre-tokenizer "
                          "over its vocabulary and merges), which loses its spaces: these ids follow tokenizer.json",
                          stacklevel=2)
        elif tokenizer_class == "Qwen2Tokenizer" and isinstance(named_class, str) and \
                named_class.removesuffix("Fast") in _LLAMA_CLASSES:
            warnings.warn(f"load_hf_tokenizer: {path} names a Llama tokenizer class for model_type qwen2, for which "
                          "transformers 5 builds a Qwen2Tokenizer from tokenizer.json's vocabulary and merges: these "
                          "ids follow tokenizer.json", stacklevel=2)
        _warn_rebuilds(path, tokenizer_class or _REGISTERED_CLASSES.get(model_config.get("model_type")), tokenizer,
                       config)
        present = tokenizer.get_added_tokens_decoder()
        tokenizer.add_tokens(_added_tokens(present, config, legacy_map, raw, config_file,
                                           present=[t.content for t in present.values()]))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: "default", and "tool_use" for calls with tools
        template = {t["name"]: t["template"] for t in template
                    if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    elif template is not None and not isinstance(template, str):
        raise CheckpointError(f"{os.path.join(path, 'tokenizer_config.json')}: chat_template must be a string (a Jinja "
                              f"template) or a list of named ones; got {template!r}")
    # template files win over the config's entry: chat_template.jinja (transformers >= 4.43) as "default", and
    # transformers 5's named templates, additional_chat_templates/NAME.jinja (e.g. "tool_use")
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isdir(jinja):
        raise CheckpointError(f"{jinja} is a directory; expected the chat template's text")
    named_dir = os.path.join(path, "additional_chat_templates")
    files = {"default": jinja} if os.path.isfile(jinja) else {}
    if os.path.isdir(named_dir):
        files.update({f.removesuffix(".jinja"): os.path.join(named_dir, f) for f in sorted(os.listdir(named_dir))
                      if f.endswith(".jinja") and os.path.isfile(os.path.join(named_dir, f))})
    texts = {}
    for name, file in files.items():
        with open(file, encoding="utf-8") as f:
            try:
                texts[name] = f.read()
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{file}: not UTF-8 text ({e})") from e
    if texts:
        template = texts["default"] if list(texts) == ["default"] else texts
    # transformers cleans up decoded text ("a ." -> "a.") where asked, but not for a BPE model unless told so twice
    clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
        type(tokenizer.model).__name__ != "BPE" or
        bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
    return HFTokenizer(tokenizer, special, template if isinstance(template, (str, dict)) else None, infilling,
                       clean_up)


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
