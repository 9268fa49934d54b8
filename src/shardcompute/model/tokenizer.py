"""Tokenizer and chat template from a HF model directory or from GGUF metadata.

A GGUF carries its vocabulary, merges and special ids as metadata (llama.cpp's key names), not
a `tokenizer.json`. We rebuild a fast tokenizer from them with the `tokenizers` library, then
cache it beside the file as `tokenizer.json` + `tokenizer_config.json`, because rebuilding
takes seconds and every rank of every run needs it.

Nothing here imports MLX: the coordinator tokenizes at its door with these functions.
transformers is imported when first needed (its AutoTokenizer alone pulls in torch).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from shardcompute.errors import ModelFormatError
from shardcompute.model.gguf_file import read_metadata

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CACHE_VERSION = 1  # bump when the build below changes, so stale caches are rebuilt
CACHE_SUFFIX = ".tokenizer"  # model.gguf -> model.gguf.tokenizer/
STAMP_FILE = "shardcompute_source.json"

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split rules of byte-level vocabularies, by `tokenizer.ggml.pre`. Each is the regex the
# vocabulary's merges were learned with; GPT-2's own regex is the ByteLevel default.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GPT2_STYLE = ("gpt2", "default", "smollm")
# llama.cpp takes a whole pre-token that is in the vocabulary without merging (Llama 3 does).
_IGNORE_MERGES = ("llama-bpe", "llama3")
SUPPORTED_PRE = (*_GPT2_STYLE, *_SPLIT_REGEX)
SUPPORTED_MODELS = ("gpt2", "llama")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer of a HF model directory or a `.gguf` file."""
    path = Path(path)
    if path.is_dir():
        return _load_hf_dir(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such tokenizer file or model directory")
    if path.suffix != ".gguf":
        raise ModelFormatError(f"{path}: not a .gguf file or a model directory")
    cache = path.with_name(path.name + CACHE_SUFFIX)
    stamp = _stamp(path)
    flags = _cached_flags(cache, stamp)
    if flags is not None:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(cache), **flags)
    tokenizer = tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    _write_cache(tokenizer, cache, stamp)
    return tokenizer


def _load_hf_dir(path: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelFormatError(
            f"{path}: no tokenizer.json or tokenizer_config.json in the directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot load the tokenizer: {e}") from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ModelFormatError(f"{path}: {type(tokenizer).__name__} is not a fast tokenizer")
    return tokenizer


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a GGUF file as Python values, read without MLX."""
    return read_metadata(path)


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer from GGUF metadata (as `read_gguf_metadata` returns it)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError(
            f"{source}: no tokenizer in the GGUF (tokenizer.ggml.tokens missing)"
        )
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, source)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta)
    else:
        raise ModelFormatError(
            f"{source}: unsupported GGUF tokenizer model {kind!r}; "
            f"supported: {', '.join(SUPPORTED_MODELS)}"
        )
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    backend.add_special_tokens(_added(tokens, types, CONTROL, special=True))
    backend.add_tokens(_added(tokens, types, USER_DEFINED, special=False))
    return _wrap(backend, meta, tokens)


def _byte_level_bpe(meta: dict[str, Any], source: str) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise ModelFormatError(
            f"{source}: unsupported GGUF pre-tokenizer {pre!r}; "
            f"supported: {', '.join(SUPPORTED_PRE)}"
        )
    vocab = {tok: i for i, tok in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLIT_REGEX:
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":  # SmolLM splits digits one by one before the GPT-2 regex
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer]
            )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE (Llama 2, TinyLlama, Mistral): merges recovered from the token scores."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    bpe = models.BPE(
        vocab,
        _merges_from_scores(tokens, types, scores),
        unk_token=tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """Every split of a normal token into two known pieces, best merged-token score first."""
    ids = {tok: i for i, tok in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for tok, i in ids.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _added(tokens: list[str], types: list[int], kind: int, special: bool) -> list[AddedToken]:
    """Tokens of one type, matched whole in the text (never split by BPE)."""
    return [
        AddedToken(tok, special=special, normalized=False)
        for tok, t in zip(tokens, types, strict=True)
        if t == kind
    ]


def _wrap(backend: Tokenizer, meta: dict[str, Any], tokens: list[str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    default_bos = meta.get("tokenizer.ggml.model") == "llama"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def _stamp(path: Path) -> dict[str, Any]:
    """What identifies the GGUF a cache was built from."""
    st = path.stat()
    return {
        "version": CACHE_VERSION,
        "gguf": path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _cached_flags(cache: Path, stamp: dict[str, Any]) -> dict[str, bool] | None:
    """The BOS/EOS flags of a cache built from this very file, or None if there is none."""
    try:
        record = json.loads((cache / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = all((cache / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return record.get("flags") if complete and record.get("source") == stamp else None


def _write_cache(tokenizer: PreTrainedTokenizerFast, cache: Path, stamp: dict[str, Any]) -> None:
    """Save beside the GGUF; best effort (a read-only directory just means no cache).

    Written into a temporary directory and renamed, so ranks starting together never read a
    half-written cache.
    """
    try:
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    except OSError:
        return
    try:
        tokenizer.save_pretrained(str(tmp))
        # transformers drops `add_bos_token` from a saved config that has a tokenizer.json, so
        # a reload would report False while the saved post-processor still adds BOS.
        flags = {"add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token}
        (tmp / STAMP_FILE).write_text(json.dumps({"source": stamp, "flags": flags}))
        if _cached_flags(cache, stamp) is not None:
            return  # another rank wrote it meanwhile
        shutil.rmtree(cache, ignore_errors=True)  # stale: built from another file
        tmp.rename(cache)
    except OSError:
        pass  # another process won the race, or the disk is read-only
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ByteTokenizer:
    """For random-weight models, which have no tokenizer: prompt bytes in, token ids out."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def apply_chat_template(self, messages, **_) -> list[int]:
        return self.encode("\n".join(m["content"] for m in messages))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of raw text (a completion prompt), special tokens as the tokenizer adds them."""
    return list(tokenizer.encode(text))


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the model's chat template, ready for the reply."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)
