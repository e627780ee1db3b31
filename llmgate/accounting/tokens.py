# -*- test-case-name: tests.accounting.test_tokens -*-
"""
Offline tiktoken encodings and token estimates.

tiktoken downloads BPE files on first use and the gateway's hosts have no
route out (a fetch would hang start-up, and tiktoken's own cache falls back to
downloading when its directory is not writable). So the
two encodings we need are shipped as package data (``llmgate/accounting/encodings``)
and built here from those files, with the pattern strings and special
tokens copied from ``tiktoken_ext/openai_public.py`` (tiktoken 0.14).

The files are read and hash-checked here rather than through
``tiktoken.load.load_tiktoken_bpe``: that function goes through
``read_file_cached``, which copies the file into ``TIKTOKEN_CACHE_DIR`` (or
``$TMPDIR/data-gym-cache``) and raises if a configured cache dir is not
writable. The file format parsed below is the same one that
``load_tiktoken_bpe`` parses (``base64-token rank`` per line).

Building both encodings takes about a second: call L{load_encodings} once at
start-up, off the reactor thread. Encoding a large prompt also takes time
(tiktoken's Rust encoder releases the GIL), so the gateway should count big
prompts in a thread too.

Claude models are counted with cl100k_base. Anthropic's tokenizer is not
public, so for them every count here is only an estimate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from typing import Any

import tiktoken

__all__ = [
    "ENCODINGS",
    "load_encodings",
    "get_encoding",
    "encoding_name_for_model",
    "count_text",
    "estimate_prompt_tokens",
]

_ENCODINGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encodings")

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# name -> (sha256 of the .tiktoken file, pat_str, special tokens); copied
# from tiktoken_ext/openai_public.py (the hashes are those of the published files).
ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
}

_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4")

_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def _read_ranks(path: str, expected_hash: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        contents = f.read()
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_hash:
        raise ValueError(
            f"{path}: sha256 {actual} does not match the expected {expected_hash}; "
            "the packaged encoding file is corrupt or was replaced"
        )
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(name: str, directory: str = _ENCODINGS_DIR) -> tiktoken.Encoding:
    """
    Build encoding C{name} from C{directory}/C{name}.tiktoken, uncached.

    @raise KeyError: unknown encoding name.
    @raise ValueError: the file's hash is wrong.
    """
    expected_hash, pat_str, special = ENCODINGS[name]
    ranks = _read_ranks(os.path.join(directory, name + ".tiktoken"), expected_hash)
    enc = tiktoken.Encoding(
        name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=dict(special)
    )
    # The Rust core holds its own copy of the ranks; tiktoken keeps the
    # Python dict only to pickle the encoding, which we never do. Dropping
    # it saves ~20 MB per encoding in a long-running daemon.
    enc._mergeable_ranks = {}
    return enc


def get_encoding(name: str) -> tiktoken.Encoding:
    """The cached encoding C{name}, built on first use (about 0.5 s)."""
    enc = _cache.get(name)
    if enc is None:
        with _lock:
            enc = _cache.get(name)
            if enc is None:
                enc = _cache[name] = build_encoding(name)
    return enc


def load_encodings() -> None:
    """Build every encoding now; call once at start-up, off the reactor."""
    for name in ENCODINGS:
        get_encoding(name)


def encoding_name_for_model(model: str) -> str:
    """
    ``o200k_base`` for the gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and o-series
    families; ``cl100k_base`` for everything else (older OpenAI models,
    embeddings, and as the stand-in for other vendors such as claude-*).
    """
    m = model.lower()
    if "/" in m:  # "openai/gpt-4o" style names
        m = m.rsplit("/", 1)[1]
    if m.startswith("ft:"):  # fine-tunes: "ft:gpt-4o-mini-2024-07-18:org::id"
        m = m[3:]
    return "o200k_base" if m.startswith(_O200K_PREFIXES) else "cl100k_base"


def count_text(model: str, text: str) -> int:
    """
    Tokens in C{text} for C{model}'s encoding. Special-token strings such as
    ``<|endoftext|>`` are counted as ordinary text (user input may contain
    them; it must not raise).
    """
    if not text:
        return 0
    return _count(get_encoding(encoding_name_for_model(model)), [text])


# tiktoken's BPE is quadratic in the length of one pre-token "piece", and a
# piece has no length bound: a 30 MB prompt of one repeated letter is one
# piece, hours of CPU and GiBs of memory in one estimate. Text is counted in
# slices of this many characters (one token may be split at each cut: about
# 0.1% more tokens on prose)...
_SLICE = 4096
# ...and only up to this many characters per estimate (about 0.2 s of CPU
# at worst); the rest is scaled from the counted part's characters per token.
_EXACT_CHARS = 1_000_000


def _count(enc: Any, texts: list[str]) -> int:
    """Tokens in C{texts}, bounded in time and memory (see L{_SLICE})."""
    tokens = chars = rest = 0
    encode = enc.encode_ordinary
    for t in texts:
        if not t:
            continue
        if len(t) <= _SLICE and chars + len(t) <= _EXACT_CHARS:
            tokens += len(encode(t))
            chars += len(t)
            continue
        take = max(0, min(len(t), _EXACT_CHARS - chars))
        for i in range(0, take, _SLICE):
            tokens += len(encode(t[i:min(i + _SLICE, take)]))
        chars += take
        rest += len(t) - take
    if rest and chars:
        tokens += round(rest * tokens / chars)
    return tokens


# Per OpenAI's cookbook ("How to count tokens with tiktoken"): every chat
# message costs 3 tokens of framing, a name 1 more, and the reply is primed
# with 3. Anthropic's framing is not documented; the same numbers are used.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


def _texts(value, out: list[str]) -> None:
    """Collect the text a request carries, recursively, from the fields
    models read: strings, ``text``/``content``/``input``/``arguments``/
    ``output``/``thinking`` parts; tool inputs (dicts) as JSON."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _texts(item, out)
    elif isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image", "image_url", "input_image", "input_audio", "file", "input_file", "document"):
            return  # not text; priced by the provider in other ways
        for key in ("text", "content", "output", "arguments", "thinking", "refusal", "name"):
            if key in value:
                _texts(value[key], out)
        if isinstance(value.get("input"), dict):  # Anthropic tool_use blocks
            out.append(json.dumps(value["input"], ensure_ascii=False))
        elif "input" in value:
            _texts(value["input"], out)
        fn = value.get("function")
        if isinstance(fn, dict):
            _texts(fn, out)
        calls = value.get("tool_calls")
        if isinstance(calls, list):
            _texts(calls, out)


def _prompt_like(value, texts: list[str]) -> int:
    """
    Collect the text of a prompt or embeddings input into C{texts}; the
    number of pre-tokenised ids it holds. (Module level, not a closure: a
    recursive closure is a reference cycle, garbage for the collector on
    every request.)
    """
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        return len(value)  # one pre-tokenised prompt
    if isinstance(value, list):
        return sum(_prompt_like(v, texts) for v in value)
    _texts(value, texts)
    return 0


def estimate_prompt_tokens(model: str, body: dict, api: str) -> int:
    """
    Approximate prompt tokens for a request body, for use before the
    provider reports usage (budget checks) or when it never does.

    Counts the text of ``messages`` (chat, Anthropic), ``system``,
    ``instructions``, ``input`` (Responses, embeddings), ``prompt``
    (completions) and tool definitions (as JSON), plus the cookbook's 3
    tokens per message, 1 per ``name`` and 3 for reply priming. Token-id
    arrays (completions/embeddings) count one per id. Images, audio and
    files are not counted. Accurate to a few percent for OpenAI text;
    for Claude only a cl100k-based estimate.
    """
    if not isinstance(body, dict):
        return 0
    texts: list[str] = []
    overhead = 0
    ids = 0
    if api in ("openai.completions",):
        ids += _prompt_like(body.get("prompt"), texts)
    elif api == "openai.embeddings":
        ids += _prompt_like(body.get("input"), texts)
    else:
        messages = body.get("messages")
        if isinstance(messages, list):
            for msg in messages:
                overhead += _PER_MESSAGE
                if isinstance(msg, dict):
                    if msg.get("name"):
                        overhead += _PER_NAME
                    _texts({k: v for k, v in msg.items() if k != "role"}, texts)
            overhead += _REPLY_PRIMING
        system = body.get("system")
        if system is not None:
            overhead += _PER_MESSAGE
            _texts(system, texts)
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            overhead += _PER_MESSAGE
            texts.append(instructions)
        if api == "openai.responses":
            inp = body.get("input")
            if isinstance(inp, str):
                overhead += _PER_MESSAGE + _REPLY_PRIMING
                texts.append(inp)
            elif isinstance(inp, list):
                overhead += _PER_MESSAGE * len(inp) + _REPLY_PRIMING
                _texts(inp, texts)
        for key in ("tools", "functions"):
            tools = body.get(key)
            if tools:
                texts.append(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    enc = get_encoding(encoding_name_for_model(model))
    return overhead + ids + _count(enc, texts)
