"""models.tokenizer.load_hf_tokenizer against transformers' own tokenizer of the same files.

tests/fixtures/hf_tokenizer/ (scripts/fixtures/make_hf_fixtures.py): a small byte-level BPE in Llama 3's layout
(BOS added by tokenizer.json's post-processor, ChatML in chat_template.jinja), saved and reloaded by transformers,
with transformers' ids of plain texts (with and without special tokens), its rendered chat prompts and their ids
(``apply_chat_template(tokenize=True)``), and its decoding. tests/fixtures/hf_tokenizer_llama2/: a small BPE in
Llama 2's SentencePiece layout with Llama 2's tokenizer_config.json, and transformers' outputs for it under several
configurations (legacy, add_prefix_space, the CodeLlama class, model_type mistral). tests/fixtures/hf_tokenizer_gemma/:
a small BPE in Gemma 1's layout with the tokenizer_config.json, special_tokens_map.json and config.json transformers
4 saved for Gemma (and, in v5/, the files transformers 5 saves), with transformers' outputs under several
configurations (Gemma 1.1's special turn markers, CodeGemma's FIM tokens, no tokenizer_class, add_eos_token, ...).
"""

from __future__ import annotations

import json
import re
import pathlib
import shutil
import warnings

import pytest

pytest.importorskip("tokenizers", reason="optional 'tokenizers' package not installed: pip install -e '.[demo]'")
pytest.importorskip("jinja2", reason="optional 'jinja2' package not installed: pip install -e '.[demo]'")

from models.tokenizer import load_hf_tokenizer, render_chat  # noqa: E402
from scripts.fixtures.gemma_cases import gemma_case_files  # noqa: E402

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_tokenizer"
WANT = json.loads((FIXTURE / "transformers_outputs.json").read_text(encoding="utf-8"))
LLAMA2_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_tokenizer_llama2"
LLAMA2 = json.loads((LLAMA2_FIXTURE / "transformers_outputs.json").read_text(encoding="utf-8"))["cases"]
GEMMA_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_tokenizer_gemma"
GEMMA = json.loads((GEMMA_FIXTURE / "transformers_outputs.json").read_text(encoding="utf-8"))


def test_ids_and_special_tokens_match_transformers():
    tok = load_hf_tokenizer(FIXTURE)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (WANT["bos_id"], WANT["eos_id"], WANT["pad_id"],
                                                                    WANT["vocab_size"])
    for case in WANT["texts"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]  # the post-processor's BOS, as tokenizer(text)
        assert tok.encode(case["text"], add_bos=False) == case["ids_no_special"], case["text"]
        assert tok.encode(case["text"], add_bos=True) == [tok.bos_id] + case["ids_no_special"]


def test_chat_prompts_match_transformers():
    """The rendered prompt, its ids (encoded without special tokens, as apply_chat_template(tokenize=True): the
    template writes its BOS itself) and the decoding with special tokens skipped."""
    tok = load_hf_tokenizer(FIXTURE)
    for case in WANT["chats"]:
        text = tok.apply_chat_template(case["messages"])
        assert text == case["text"]
        assert tok.encode(text, add_bos=False) == case["ids"]
        assert tok.decode(case["ids"]) == case["decoded"]


def test_chat_template_in_tokenizer_config_and_missing_files(tmp_path):
    """The template may sit in tokenizer_config.json (older saves) instead of chat_template.jinja; no
    tokenizer.json is a FileNotFoundError naming it; no template at all, a ValueError on use."""
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    config["chat_template"] = (FIXTURE / "chat_template.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    case = WANT["chats"][0]
    assert load_hf_tokenizer(tmp_path).apply_chat_template(case["messages"]) == case["text"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=None)))
    with pytest.raises(ValueError, match="no chat template"):
        load_hf_tokenizer(tmp_path).apply_chat_template(case["messages"])
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        load_hf_tokenizer(tmp_path / "nowhere")


def test_named_chat_templates_in_transformers_5s_files(tmp_path):
    """transformers 5 saves named templates as additional_chat_templates/NAME.jinja beside chat_template.jinja (the
    default), and reads them over tokenizer_config.json's entry: "tool_use" where tools are given (they were not
    read: the default rendered with tools); without chat_template.jinja the files alone, no default."""
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    shutil.copy(FIXTURE / "tokenizer_config.json", tmp_path)
    default = (FIXTURE / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").write_text(default)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS " + default)
    case = WANT["chats"][0]
    tok = load_hf_tokenizer(tmp_path)
    assert tok.apply_chat_template(case["messages"]) == case["text"]
    assert tok.apply_chat_template(case["messages"], tools=[{"name": "f"}]) == "TOOLS " + case["text"]
    (tmp_path / "chat_template.jinja").unlink()
    tok = load_hf_tokenizer(tmp_path)
    assert tok.apply_chat_template(case["messages"], tools=[]) == "TOOLS " + case["text"]
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(case["messages"])


def test_unreadable_tokenizer_json_and_chat_template_name_the_file(tmp_path):
    """A truncated or non-JSON tokenizer.json raised tokenizers' bare Exception without the path; a chat_template.jinja
    that is not UTF-8, a bare UnicodeDecodeError. Both are CheckpointErrors naming the file."""
    from models.checkpoint import CheckpointError  # noqa: PLC0415

    good = (FIXTURE / "tokenizer.json").read_bytes()
    for data in (b"", good[:len(good) // 2], b"\xff\xfe"):
        (tmp_path / "tokenizer.json").write_bytes(data)
        with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a readable tokenizer\.json \(.+\)"):
            load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(good)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja: not UTF-8 text \(.*can't decode byte 0xff"):
        load_hf_tokenizer(tmp_path)


def test_tokenizer_files_of_the_wrong_kind_are_named_not_skipped(tmp_path):
    """A directory named tokenizer_config.json (or special_tokens_map.json, chat_template.jinja) was skipped as if
    absent, losing the special tokens or the template without a word; a chat_template that is not text (an integer)
    was dropped. Each is a CheckpointError naming the file."""
    from models.checkpoint import CheckpointError  # noqa: PLC0415

    for name, match in [("tokenizer_config.json", "is a directory; expected a JSON file"),
                        ("chat_template.jinja", "is a directory; expected the chat template's text")]:
        d = tmp_path / name.split(".")[0]
        shutil.copytree(FIXTURE, d)
        (d / name).unlink()
        (d / name).mkdir()
        with pytest.raises(CheckpointError, match=re.escape(str(d / name)) + " " + match):
            load_hf_tokenizer(d)
    d = tmp_path / "int_template"
    shutil.copytree(FIXTURE, d)
    (d / "chat_template.jinja").unlink()
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=5)))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: chat_template must be a string .*got 5"):
        load_hf_tokenizer(d)


@pytest.mark.parametrize("decoder", [[{"content": "<x>"}], {"x": {"content": "<x>"}}, {"5": "<x>"}],
                         ids=["list", "id_not_integer", "entry_not_object"])
def test_a_malformed_added_tokens_decoder_is_named(tmp_path, decoder):
    """tokenizer_config.json's added_tokens_decoder of the wrong form raised a bare AttributeError / ValueError /
    TypeError."""
    from models.checkpoint import CheckpointError  # noqa: PLC0415

    llama = FIXTURE.parent / "hf_tokenizer_llama2"  # a LlamaTokenizer: rebuilt with the decoder's added tokens
    (tmp_path / "tokenizer.json").write_bytes((llama / "tokenizer.json").read_bytes())
    config = json.loads((llama / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, added_tokens_decoder=decoder)))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "tokenizer_config.json")) +
                       r": added_tokens_decoder must map token ids"):
        load_hf_tokenizer(tmp_path)


def test_a_piece_without_unk_or_byte_token_is_a_value_error(tmp_path):
    """A Gemma tokenizer.json without "<unk>" whose byte tokens miss one byte: transformers' tokenizer loads it and
    fails on a text holding that byte (tokenizers' bare Exception); here a ValueError naming the text, and other
    texts encode as before."""
    shutil.copytree(GEMMA_FIXTURE, tmp_path, dirs_exist_ok=True)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    del spec["model"]["vocab"]["<unk>"], spec["model"]["vocab"]["<0xE2>"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<unk>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {i: t for i, t in decoder.items() if t["content"] != "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.encode("hello world") == load_hf_tokenizer(GEMMA_FIXTURE).encode("hello world")
    with pytest.raises(ValueError, match=r"cannot encode 'a \u2603 b' \(Unk token `<unk>` not found .*unk token is "
                                         r"not in the vocabulary"):
        tok.encode("a \u2603 b")


def test_demo_runs_an_hf_checkpoint_with_its_tokenizer(tmp_path, capsys):
    """`python -m models --model DIR` on an HF checkpoint directory with a tokenizer.json: the checkpoint's own
    tokenizer and chat template (the questions as chats), not the byte tokenizer; an unsupported config is a clear
    error, not a traceback."""
    import jax.numpy as jnp

    import models
    from models.config import LlamaConfig
    from models.demo import main

    config = LlamaConfig(vocab_size=WANT["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         bos_token_id=WANT["bos_id"], eos_token_ids=(WANT["eos_id"],), model_type="qwen2")
    models.save_checkpoint(models.init_random(config, jnp.float32), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURE / name, tmp_path)
    assert main(["--model", str(tmp_path), "--samples", "1", "--max-new-tokens", "3", "--modes", "hydragen",
                 "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "1/4" not in out and "4/2 q/kv heads" in out and "> Why is the sky blue?" in out
    tree = out.split("sharing tree: ")[1].splitlines()[0]
    assert "shared levels: 1 node(s)" in tree  # the chat template's system prompt, shared by every question
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), model_type="gpt2")))
    assert main(["--model", str(tmp_path), "--samples", "1", "--max-new-tokens", "2"]) == 1
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err


def test_files_as_transformers_reads_them(tmp_path):
    """What transformers does with the same files, beyond the fixture's own layout: truncation / padding saved in
    tokenizer.json are off; the named tokens of special_tokens_map.json (old saves) when tokenizer_config.json has
    none; a named token that tokenizer.json lacks (or holds as a plain entry) is matched whole and dropped by decode;
    every ``*_token`` reaches the template; the "tool_use" template of a named list is used where tools are given."""
    tokenizer = json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    tokenizer["padding"] = {"strategy": {"Fixed": 24}, "direction": "Right", "pad_to_multiple_of": None,
                            "pad_id": 1, "pad_type_id": 0, "pad_token": "<|end_of_text|>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    names = {k: config.pop(k) for k in ("bos_token", "eos_token", "pad_token")}
    config["image_token"] = "<image>"  # a model's own named token, not in tokenizer.json
    template = "{{ bos_token }}{{ image_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config["chat_template"] = [{"name": "default", "template": template},
                               {"name": "tool_use", "template": "TOOLS " + template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(names))
    tok = load_hf_tokenizer(tmp_path)
    case = WANT["texts"][0]
    assert tok.encode(case["text"]) == case["ids"]  # neither cut to 4 nor padded to 24
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (WANT["bos_id"], WANT["eos_id"], WANT["pad_id"])
    image = tok.encode("<image>", add_bos=False)
    assert len(image) == 1 and tok.decode(image + case["ids_no_special"]) == case["text"]
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == "<|begin_of_text|><image>hi"
    assert tok.apply_chat_template(chat, tools=[]) == "TOOLS <|begin_of_text|><image>hi"


def _llama2_case(tmp_path, name):
    """hf_tokenizer_llama2's files with the tokenizer_config.json changes (and config.json) of case ``name``."""
    case = LLAMA2[name]
    shutil.copy(LLAMA2_FIXTURE / "tokenizer.json", tmp_path)
    config = json.loads((LLAMA2_FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, **case["tokenizer_config"])))
    if case["model_type"] is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": case["model_type"]}))
    return case


@pytest.mark.parametrize("name", list(LLAMA2))
def test_llama2_layout_as_transformers_5_rebuilds_it(tmp_path, name):
    """A LlamaTokenizer / CodeLlamaTokenizer whose tokenizer.json is in Llama 2's SentencePiece layout
    (tests/fixtures/hf_tokenizer_llama2): transformers 5 rebuilds its pipeline (a Metaspace pre-tokenizer for the
    normalizer), which changes the ids of text after a space or a special token, by legacy and add_prefix_space;
    CodeLlama adds its infilling tokens and encodes a text with its fill token in the infilling format; with
    model_type mistral AutoTokenizer reads tokenizer.json as written. The ids, decodings, named tokens and chat
    prompts are transformers'."""
    case = _llama2_case(tmp_path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: none of these is left unfollowed
        tok = load_hf_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (case["bos_id"], case["eos_id"], case["pad_id"],
                                                                    case["vocab_size"])
    assert tok.special == case["special_tokens"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="encode: after an infilling text")
        for c in case["texts"]:
            assert tok.encode(c["text"]) == c["ids"], c["text"]
            assert tok.encode(c["text"], add_bos=False) == c["ids_no_special"], c["text"]
            assert tok.encode(c["text"], add_bos=True) == [tok.bos_id] + c["ids_no_special"], c["text"]
            assert tok.decode(c["ids"]) == c["decoded"], c["text"]
    for c in case["chats"]:
        text = tok.apply_chat_template(c["messages"])
        assert text == c["text"]
        assert tok.encode(text, add_bos=False) == c["ids"]
        assert tok.decode(c["ids"]) == c["decoded"]


def test_llama2_layout_differs_from_tokenizer_json_and_codellama_infilling(tmp_path):
    """The cases the rebuild is for: tokenizer.json alone (SentencePiece's, transformers 4's ids) gives other ids for
    text after a space or a special token. CodeLlama: a second fill token is a ValueError, as in transformers; an
    infilling text warns that transformers' tokenizer then keeps SentencePiece's normalizer."""
    from tokenizers import Tokenizer

    as_written = Tokenizer.from_file(str(LLAMA2_FIXTURE / "tokenizer.json"))
    texts = {c["text"]: c for c in LLAMA2["llama2"]["texts"]}
    for text in (" Hello world", "<s>Hello", "Hello</s> world"):
        assert as_written.encode(text).ids != texts[text]["ids"]
    _llama2_case(tmp_path, "codellama")
    tok = load_hf_tokenizer(tmp_path)
    with pytest.raises(ValueError):
        tok.encode("a<FILL_ME>b<FILL_ME>c")
    with pytest.warns(UserWarning, match="keeps SentencePiece's normalizer"):
        tok.encode("a<FILL_ME>b")


def test_llama_class_on_a_byte_level_tokenizer_warns(tmp_path):
    """A Llama class naming a tokenizer.json that is not SentencePiece-style (byte-level, as hf_tokenizer):
    transformers 5 rebuilds it all the same (and loses its spaces); the loader says so and keeps tokenizer.json's
    ids. The generic class reads tokenizer.json as written: nothing to say."""
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="LlamaTokenizerFast")))
    with pytest.warns(UserWarning, match="not a SentencePiece-style BPE"):
        tok = load_hf_tokenizer(tmp_path)
    assert tok.encode(WANT["texts"][0]["text"]) == WANT["texts"][0]["ids"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="PreTrainedTokenizerFast")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hf_tokenizer(tmp_path)


def test_tokenizer_class_defaults_for_left_out_named_tokens(tmp_path):
    """A named token the files leave out takes its tokenizer class's default, as in transformers (Qwen2Tokenizer:
    unk / eos / pad "<|endoftext|>"); given as null, none."""
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("pad_token", "eos_token")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="Qwen2Tokenizer")))
    with pytest.warns(UserWarning, match="rebuilds a Qwen2Tokenizer"):  # (the fixture has no NFC normalizer)
        tok = load_hf_tokenizer(tmp_path)
    assert tok.pad_id is not None and tok.pad_id == tok.eos_id == tok.encode("<|endoftext|>", add_bos=False)[0]
    assert tok.special["unk_token"] == "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="Qwen2Tokenizer",
                                                                    pad_token=None)))
    with pytest.warns(UserWarning, match="rebuilds a Qwen2Tokenizer"):
        assert load_hf_tokenizer(tmp_path).pad_id is None


@pytest.mark.parametrize("changes, match", [
    ({"tokenizer_class": "GPT2Tokenizer"}, "rebuilds a GPT2Tokenizer from its vocabulary and merges under GPT-2's"),
    ({"tokenizer_class": "Qwen2Tokenizer"}, r"rebuilds a Qwen2Tokenizer .* NFC and add_prefix_space False"),
    ({"split_special_tokens": True}, "sets split_special_tokens .* not followed"),
])
def test_tokenizers_transformers_builds_otherwise_are_named(tmp_path, changes, match):
    """Where transformers 5 builds another tokenizer than tokenizer.json says and the loader reads the file as
    written (a review compared transformers' ids: SmolLM2's files name GPT2Tokenizer, whose rebuild drops their
    digit splits; a Qwen2Tokenizer adds NFC and add_prefix_space; split_special_tokens), a warning says so (they
    were silently other ids); the fixture as saved (its own class, a ByteLevel BPE) warns of nothing."""
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hf_tokenizer(tmp_path)
    if changes.get("tokenizer_class") == "GPT2Tokenizer":
        with warnings.catch_warnings():  # the fixture's plain ByteLevel is what the rebuild makes: nothing to say
            warnings.simplefilter("error")
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, **changes)))
            load_hf_tokenizer(tmp_path)
        spec = json.loads((tmp_path / "tokenizer.json").read_text())  # SmolLM2's digit splits before it
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, **changes)))
    with pytest.warns(UserWarning, match=match):
        load_hf_tokenizer(tmp_path)


def test_special_tokens_map_only_without_added_tokens_decoder(tmp_path):
    """special_tokens_map.json (old saves) is read only where tokenizer_config.json has no added_tokens_decoder, and
    then its standard names win over tokenizer_config.json's (a model's own names do not), as transformers'
    ``_from_pretrained`` reads them (checked against transformers 5.17)."""
    shutil.copy(LLAMA2_FIXTURE / "tokenizer.json", tmp_path)
    config = dict(json.loads((LLAMA2_FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8")),
                  image_token="<s>")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>", "pad_token": "</s>",
                                                                  "image_token": "</s>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_hf_tokenizer(tmp_path)
    assert (tok.bos_id, tok.pad_id, tok.special["image_token"]) == (1, None, "<s>")
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_hf_tokenizer(tmp_path)
    assert (tok.bos_id, tok.pad_id, tok.special["image_token"]) == (2, 2, "<s>")


def _gemma_case(tmp_path, name):
    """hf_tokenizer_gemma's files changed as case ``name`` says (``gemma_cases.gemma_case_files``, as the fixture's
    generator did before recording transformers' outputs)."""
    want = GEMMA["cases"][name]
    gemma_case_files(GEMMA_FIXTURE, want["case"], tmp_path)
    return want


def _assert_gemma_outputs(tok, want):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (want["bos_id"], want["eos_id"], want["pad_id"],
                                                                    want["vocab_size"])
    assert tok.special == want["special_tokens"]
    for text, ids, ids_no_special, decoded in zip(GEMMA["texts"], want["ids"], want["ids_no_special"],
                                                  want["decoded"], strict=True):
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_bos=False) == ids_no_special, text
        assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids_no_special, text
        assert tok.decode(ids) == decoded, text
    for messages, c in zip(GEMMA["chats"], want["chats"], strict=True):
        text = tok.apply_chat_template(messages)
        assert text == c["text"]
        assert tok.encode(text, add_bos=False) == c["ids"]
        assert tok.decode(c["ids"]) == c["decoded"]


@pytest.mark.parametrize("name", list(GEMMA["cases"]))
def test_gemma_as_transformers_5_builds_it(tmp_path, name):
    """A GemmaTokenizer (Gemma 1, 1.1, CodeGemma; tests/fixtures/hf_tokenizer_gemma): transformers 5 rebuilds its
    pipeline from tokenizer.json's vocabulary, merges and post-processor, takes its added tokens from
    tokenizer_config.json's added_tokens_decoder (a FIM token left out there is no added token; strip flags as
    given), adds its default named tokens ("<mask>" too), drops add_bos_token / add_eos_token, and builds it for
    model_type gemma where the files name no class (with neither, reads tokenizer.json as written). The ids,
    decodings, named tokens and chat prompts are transformers', for the files as transformers 4 and 5 saved them."""
    want = _gemma_case(tmp_path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = load_hf_tokenizer(tmp_path)
    _assert_gemma_outputs(tok, want)


def test_gemma_pipeline_is_gemmas_not_tokenizer_json(tmp_path):
    """transformers 5's GemmaTokenizer keeps none of tokenizer.json's normalizer, pre-tokenizer and decoder (checked
    against transformers 5.17 by scripts/fixtures/diff_gemma_tokenizer.py): with SentencePiece's Prepend("▁") and
    Llama 2's decoder written there, the ids and decodings stay those of the case "gemma", and differ from
    tokenizer.json's as written."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    want = _gemma_case(tmp_path, "gemma")
    file = str(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(file)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(file)
    assert [tok.encode(t).ids for t in GEMMA["texts"]] != want["ids"]
    _assert_gemma_outputs(load_hf_tokenizer(tmp_path), want)


def test_gemma_class_on_a_tokenizer_json_that_is_not_bpe_warns(tmp_path):
    """A GemmaTokenizer over a WordLevel tokenizer.json: transformers 5 (5.17) builds a BPE without merges over its
    vocabulary all the same, which spells "hello world" letter by letter; the loader says so and keeps
    tokenizer.json's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "hello": 5, "world": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    with pytest.warns(UserWarning, match="GemmaTokenizer whose tokenizer.json is not a BPE"):
        loaded = load_hf_tokenizer(tmp_path)
    assert loaded.encode("hello world") == [5, 6]


def test_demo_chat_prompts_with_a_template_that_refuses_a_system_message():
    """Gemma's template raises on a system message (`raise_exception('System role not supported')`): the demo puts
    its system prompt at the head of the user's turn (it crashed with jinja2's TemplateError); a template that takes
    a system message keeps it a message of its own."""
    import models.demo as demo  # noqa: PLC0415

    gemma = load_hf_tokenizer(GEMMA_FIXTURE)
    with pytest.raises(Exception, match="System role not supported"):
        gemma.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    prompts = demo._chat_prompts(gemma)
    assert len(prompts) == len(demo.QUESTIONS)
    for ids, question in zip(prompts, demo.QUESTIONS):
        want = gemma.apply_chat_template([{"role": "user", "content": f"{demo.SYSTEM_PROMPT}\n\n{question}"}])
        assert ids == gemma.encode(want, add_bos=False)
    tok = load_hf_tokenizer(FIXTURE)
    want = tok.apply_chat_template([{"role": "system", "content": demo.SYSTEM_PROMPT},
                                    {"role": "user", "content": demo.QUESTIONS[0]}])
    assert demo._chat_prompts(tok)[0] == tok.encode(want, add_bos=False)


def _fixture_files(tmp_path, changes=None, drop=(), spec=None, special_tokens_map=None, model_type=None):
    """hf_tokenizer's tokenizer.json (``spec`` changes it) and tokenizer_config.json with ``changes`` set and ``drop``
    removed, a special_tokens_map.json and a config.json of ``model_type`` where given."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    if spec:
        spec(tokenizer)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = dict(json.loads((FIXTURE / "tokenizer_config.json").read_text()), **(changes or {}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
    if special_tokens_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return tmp_path


def _added(content, **flags):
    return dict({"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}, **flags)


_DECODER = {str(i): _added(t) for i, t in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>",
                                                        "<|im_end|>"])}


def test_added_tokens_decoder_flags_and_tokens_only_there(tmp_path):
    """tokenizer_config.json's added_tokens_decoder over tokenizer.json's added tokens, as transformers 5.17 reads it
    (its ids below): its flags win ("<|im_start|>" strips the spaces around it), and a token only there is added (at
    the next id, 389, whatever id the file gives it; not special: kept by decode). Both were ignored: other ids."""
    decoder = dict(_DECODER, **{"2": _added("<|im_start|>", lstrip=True, rstrip=True),
                                "395": _added("<tool>", special=False)})
    tok = load_hf_tokenizer(_fixture_files(tmp_path, {"added_tokens_decoder": decoder}))
    assert tok.vocab_size == 390
    assert tok.encode("a <tool> b") == [0, 68, 224, 389, 262] and tok.decode([0, 68, 224, 389, 262]) == "a <tool> b"
    assert tok.encode("x <|im_start|> y") == [0, 91, 2, 92] and tok.decode([0, 91, 2, 92]) == "xy"


def test_extra_special_tokens_missing_from_tokenizer_json(tmp_path):
    """additional_special_tokens (tokenizer_config.json's, or special_tokens_map.json's in an old save), and the named
    tokens of an extra_special_tokens object, that tokenizer.json lacks: transformers 5.17 adds them as special tokens
    (matched whole, dropped by decode; an object's names defined in chat templates). They were split as text. A
    dict transformers cannot read (a TypeError) is a CheckpointError naming the file and key."""
    from models.checkpoint import CheckpointError  # noqa: PLC0415

    for i, (changes, legacy) in enumerate([({"additional_special_tokens": ["<tool>"]}, None),
                                           ({}, {"additional_special_tokens": ["<tool>"]}),
                                           ({"extra_special_tokens": {"image_token": "<tool>"}}, None)]):
        tok = load_hf_tokenizer(_fixture_files(tmp_path / str(i), changes, special_tokens_map=legacy))
        assert tok.encode("a <tool> b") == [0, 68, 224, 389, 262] and tok.decode([68, 224, 389, 262]) == "a  b"
    assert tok.special["image_token"] == "<tool>"
    untyped = {"content": "<tool>", "lstrip": True, "rstrip": True, "normalized": False, "single_word": False}
    for i, (changes, legacy, file) in enumerate([({"additional_special_tokens": [untyped]}, None, "tokenizer_config"),
                                                 ({}, {"additional_special_tokens": [untyped]}, "special_tokens_map")]):
        with pytest.raises(CheckpointError, match=rf"{file}\.json: additional_special_tokens holds .*'<tool>'.*which "
                                                  r"transformers 5 cannot read"):
            load_hf_tokenizer(_fixture_files(tmp_path / f"bad{i}", changes, special_tokens_map=legacy))


def test_named_tokens_given_as_added_token_objects(tmp_path):
    """A named token given as an AddedToken object (tokenizer_config.json's with "__type": "AddedToken", or
    special_tokens_map.json's) that tokenizer.json lacks is added with its flags, as transformers 5.17 adds it: its
    lstrip / rstrip take the spaces around it (they were dropped). In tokenizer_config.json a dict without "__type"
    fails in transformers (a TypeError): a CheckpointError naming the key for a standard name, no named token for a
    model's own (transformers ignores it)."""
    from models.checkpoint import CheckpointError  # noqa: PLC0415

    tool = {"content": "<tool>", "lstrip": True, "rstrip": True, "normalized": False, "single_word": False}
    for i, (changes, legacy) in enumerate([({"bos_token": dict(tool, __type="AddedToken")}, None),
                                           ({"bos_token": None}, {"bos_token": tool})]):
        tok = load_hf_tokenizer(_fixture_files(tmp_path / str(i), changes, special_tokens_map=legacy))
        assert (tok.bos_id, tok.encode("a <tool> b"), tok.decode([0, 68, 389, 69])) == (389, [0, 68, 389, 69], "ab")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: bos_token must be a string, null or an "
                                              r"AddedToken object .*got \{'content': '<tool>'"):
        load_hf_tokenizer(_fixture_files(tmp_path / "bad", {"bos_token": tool}))
    tok = load_hf_tokenizer(_fixture_files(tmp_path / "own", {"image_token": tool}))
    assert "image_token" not in tok.special and tok.vocab_size == 389


def test_clean_up_tokenization_spaces_on_a_model_that_is_not_bpe(tmp_path):
    """tokenizer_config.json's clean_up_tokenization_spaces: transformers 5.17 removes the spaces before punctuation
    and contractions in decoded text of a Unigram (or WordPiece, WordLevel) model, not of a BPE model unless
    clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output is set too. It was never done."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["<unk>", "<s>", "</s>", "▁hello", "▁world", "▁.", "▁?", "▁,", "▁don", "▁n't", "▁'s", "▁it", "▁!", "▁'",
              "▁go", "▁'re", "▁'m", "▁'ve", "▁a", "▁b"]
    chars = sorted(set("".join(pieces[3:])) - set(pieces))
    unigram = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)] +
                                       [(c, -10.0) for c in chars], unk_id=0, byte_fallback=False))
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    unigram.add_special_tokens(["<s>", "</s>", "<unk>"])
    unigram.save(str(tmp_path / "tokenizer.json"))
    text = "hello world . don n't go , it 's a ? b ! a ' b 're 'm 've"
    for clean_up, want in ((True, "hello world. donn't go, it's a? b! a'b're'm've"), (False, text)):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": clean_up}))
        tok = load_hf_tokenizer(tmp_path)
        assert tok.decode(tok.encode(text)) == want
    bpe = {"clean_up_tokenization_spaces": True}
    tok = load_hf_tokenizer(_fixture_files(tmp_path / "bpe", bpe))
    assert tok.decode(tok.encode("hello world . it , ok")) == "hello world . it , ok"
    bpe["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    tok = load_hf_tokenizer(_fixture_files(tmp_path / "bpe_forced", bpe))
    assert tok.decode(tok.encode("hello world . it , ok")) == "hello world. it, ok"


def test_pad_token_of_tokenizer_json_padding(tmp_path):
    """tokenizer.json's padding section names a pad token: transformers 5.17 takes it where the files give none (not
    where they give null, nor for a class whose own argument is used: GPT2Tokenizer, whose defaults are
    "<|endoftext|>" for unk, bos and eos and none for pad). It was ignored (no pad id)."""
    def padding(spec):
        spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 2,
                           "pad_type_id": 0, "pad_token": "<|im_start|>"}

    tok = load_hf_tokenizer(_fixture_files(tmp_path / "a", drop=["pad_token"], spec=padding))
    assert (tok.pad_id, tok.special["pad_token"]) == (2, "<|im_start|>")
    assert load_hf_tokenizer(_fixture_files(tmp_path / "b", {"pad_token": None}, spec=padding)).pad_id is None
    tok = load_hf_tokenizer(_fixture_files(tmp_path / "c", {"tokenizer_class": "GPT2Tokenizer"},
                                           drop=["bos_token", "eos_token", "pad_token"], spec=padding))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (389, 389, None, 390)
    assert tok.encode("a<|endoftext|>") == [0, 68, 389]
    llama = tmp_path / "llama"  # a LlamaTokenizer (rebuilt) takes it too
    llama.mkdir()
    spec = json.loads((LLAMA2_FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    padding(spec)
    spec["padding"]["pad_token"] = "</s>"
    (llama / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    config = json.loads((LLAMA2_FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8"))
    (llama / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token"}))
    assert load_hf_tokenizer(llama).pad_id == 2


def test_qwen2_model_type_without_tokenizer_class(tmp_path):
    """Files that name no tokenizer class, with config.json's model_type qwen2 (or qwen3): AutoTokenizer builds a
    Qwen2Tokenizer, whose defaults fill the named tokens left out (eos, pad and unk "<|endoftext|>", added at 389,
    as transformers 5.17). They were left unset; the rebuild's warning stays (tokenizer.json has no NFC)."""
    for model_type in ("qwen2", "qwen3"):
        with pytest.warns(UserWarning, match="rebuilds a Qwen2Tokenizer"):
            tok = load_hf_tokenizer(_fixture_files(tmp_path / model_type, drop=["tokenizer_class", "eos_token",
                                                                                "pad_token"], model_type=model_type))
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.special["unk_token"]) == (0, 389, 389, "<|endoftext|>")
        assert tok.encode("a<|endoftext|>") == [0, 68, 389] and tok.decode([0, 68, 389]) == "a"


def test_chat_template_message_checks(tmp_path):
    """An empty conversation is a ValueError, as in transformers 5.17 (it rendered the template's bare prompt). A
    message without role or content, which transformers renders with the missing keys empty ("<|im_start|>\\nhi"), is
    refused by name: a malformed prompt, not a conversation."""
    tok = load_hf_tokenizer(FIXTURE)
    with pytest.raises(ValueError, match="no messages"):
        tok.apply_chat_template([])
    for message in ({"content": "hi"}, {"role": "user"}):
        with pytest.raises(ValueError, match=r"message 0 must be a dict with 'role' and 'content'"):
            tok.apply_chat_template([message])
    messages = WANT["chats"][0]["messages"]
    assert tok.apply_chat_template(iter(messages)) == tok.apply_chat_template(messages) == WANT["chats"][0]["text"]


def test_chat_template_refuses_a_string_or_one_message_for_the_list():
    """apply_chat_template("hi") said "message 0 must be a dict ..., got 'h'" (the string read as its characters)."""
    for bad in ("hi", {"role": "user", "content": "hi"}):
        with pytest.raises(ValueError, match=r"messages must be a list of message dicts .*got (str 'hi'|dict)"):
            render_chat("{{ messages }}", bad, True, None, None, {})
