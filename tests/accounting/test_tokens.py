# -*- test-case-name: tests.accounting.test_tokens -*-
"""
Tests for L{llmgate.accounting.tokens}: encodings built offline from package data.
"""

import os
import shutil
import socket
import urllib.request

import tiktoken
import tiktoken.load
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting import tokens


def _no_network(*args, **kwargs):
    raise AssertionError("network access attempted")


class OfflineTests(SynchronousTestCase):
    def test_buildWithoutNetwork(self):
        """
        Building both encodings from scratch touches none of tiktoken's
        download paths, requests, urllib or sockets.
        """
        self.patch(tiktoken.load, "read_file", _no_network)
        self.patch(tiktoken.load, "read_file_cached", _no_network)
        self.patch(urllib.request, "urlopen", _no_network)
        self.patch(socket.socket, "connect", _no_network)
        self.patch(socket, "create_connection", _no_network)
        try:
            import requests
        except ImportError:
            pass
        else:
            self.patch(requests, "get", _no_network)
            self.patch(requests.Session, "request", _no_network)
        for name in tokens.ENCODINGS:
            enc = tokens.build_encoding(name)
            self.assertEqual(enc.name, name)
            self.assertEqual(len(enc.encode_ordinary("hello world")), 2)

    def test_hashMismatchRaises(self):
        """
        A tampered encoding file is refused with ValueError naming it.
        """
        tmp = self.mktemp()
        os.mkdir(tmp)
        src = os.path.join(os.path.dirname(tokens.__file__), "encodings", "cl100k_base.tiktoken")
        shutil.copy(src, os.path.join(tmp, "cl100k_base.tiktoken"))
        with open(os.path.join(tmp, "cl100k_base.tiktoken"), "ab") as f:
            f.write(b"IQ== 999999\n")
        exc = self.assertRaises(ValueError, tokens.build_encoding, "cl100k_base", tmp)
        self.assertIn("cl100k_base.tiktoken", str(exc))

    def test_sameAsTiktokenDefinition(self):
        """
        The pattern and special tokens are tiktoken's own (checked against
        tiktoken_ext without calling its constructors, which download).
        """
        from tiktoken_ext import openai_public

        self.assertEqual(tokens.ENDOFTEXT, openai_public.ENDOFTEXT)
        enc = tokens.get_encoding("o200k_base")
        self.assertEqual(enc.n_vocab, 200019)
        self.assertEqual(tokens.get_encoding("cl100k_base").n_vocab, 100277)
        self.assertEqual(enc.encode("<|endoftext|>", allowed_special="all"), [199999])


class CountTests(SynchronousTestCase):
    def test_helloWorld(self):
        """
        "hello world" is 2 tokens in both encodings.
        """
        self.assertEqual(tokens.count_text("gpt-4o", "hello world"), 2)
        self.assertEqual(tokens.count_text("gpt-4", "hello world"), 2)
        self.assertEqual(tokens.count_text("claude-sonnet-4", "hello world"), 2)

    def test_knownEncodings(self):
        """
        Counts that differ between the encodings, and known token ids.
        """
        self.assertEqual(tokens.get_encoding("cl100k_base").encode("hello world"), [15339, 1917])
        self.assertEqual(tokens.get_encoding("o200k_base").encode("hello world"), [24912, 2375])
        self.assertEqual(tokens.count_text("gpt-4o", ""), 0)

    def test_specialTokensAreText(self):
        """
        Special-token text in user input is counted, not rejected.
        """
        self.assertGreater(tokens.count_text("gpt-4o", "a <|endoftext|> b"), 3)

    def test_cached(self):
        """
        get_encoding returns one shared instance.
        """
        tokens.load_encodings()
        self.assertIs(tokens.get_encoding("o200k_base"), tokens.get_encoding("o200k_base"))


class ModelMappingTests(SynchronousTestCase):
    def test_o200k(self):
        """
        Newer OpenAI families use o200k_base.
        """
        for model in (
            "gpt-4o",
            "gpt-4o-mini-2024-07-18",
            "chatgpt-4o-latest",
            "gpt-4.1-2025-04-14",
            "o1",
            "o3-mini",
            "o4-mini-2025-04-16",
            "gpt-5",
            "gpt-5-mini",
            "openai/gpt-4o",
            "ft:gpt-4o-mini-2024-07-18:org::abc",
        ):
            self.assertEqual(tokens.encoding_name_for_model(model), "o200k_base", model)

    def test_cl100k(self):
        """
        Older OpenAI models, embeddings and other vendors use cl100k_base.
        """
        for model in ("gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "text-embedding-3-small", "claude-sonnet-4-5", "llama3", ""):
            self.assertEqual(tokens.encoding_name_for_model(model), "cl100k_base", model)


class EstimateTests(SynchronousTestCase):
    def test_chatCookbook(self):
        """
        Chat estimate = content tokens + 3 per message (+1 per name) + 3.
        """
        body = {
            "messages": [
                {"role": "system", "content": "hello world"},
                {"role": "user", "name": "bob", "content": [{"type": "text", "text": "hello world"}]},
            ]
        }
        # 2 + 2 (content) + 1 (the name "bob") + 3*2 + 1 + 3
        self.assertEqual(tokens.estimate_prompt_tokens("gpt-4o", body, "openai.chat"), 2 + 2 + 1 + 6 + 1 + 3)

    def test_anthropic(self):
        """
        Anthropic system and block content count; images do not.
        """
        body = {
            "system": [{"type": "text", "text": "hello world"}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hello world"},
                        {"type": "image", "source": {"type": "base64", "data": "AAAA" * 1000}},
                    ],
                }
            ],
        }
        self.assertEqual(
            tokens.estimate_prompt_tokens("claude-sonnet-4", body, "anthropic.messages"), 2 + 2 + 3 + 3 + 3
        )

    def test_otherApis(self):
        """
        Embeddings/completions count inputs (token arrays one per id, no
        framing); Responses counts instructions and input.
        """
        est = tokens.estimate_prompt_tokens
        self.assertEqual(est("text-embedding-3-small", {"input": ["hello world", "hello world"]}, "openai.embeddings"), 4)
        self.assertEqual(est("text-embedding-3-small", {"input": [[1, 2, 3], [4]]}, "openai.embeddings"), 4)
        self.assertEqual(est("gpt-3.5-turbo-instruct", {"prompt": "hello world"}, "openai.completions"), 2)
        self.assertEqual(est("gpt-4o", {"input": "hello world"}, "openai.responses"), 2 + 6)
        self.assertEqual(
            est("gpt-4o", {"instructions": "hello world", "input": "hello world"}, "openai.responses"), 4 + 9
        )
        self.assertEqual(est("gpt-4o", "not a dict", "openai.chat"), 0)

    def test_toolsCounted(self):
        """
        Tool definitions add tokens.
        """
        body = {"messages": [{"role": "user", "content": "hi"}]}
        with_tools = dict(body, tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
        self.assertGreater(
            tokens.estimate_prompt_tokens("gpt-4o", with_tools, "openai.chat"),
            tokens.estimate_prompt_tokens("gpt-4o", body, "openai.chat") + 5,
        )


class BoundedCountTests(SynchronousTestCase):
    """
    tiktoken's BPE is quadratic in the length of one piece: a 30 MB prompt
    of one letter took the estimate thread hours and GiBs. Counting is
    bounded in slice length and in characters per estimate.
    """

    def fake_encoding(self) -> list[int]:
        seen: list[int] = []

        class Enc:
            def encode_ordinary(self, text: str) -> list[int]:
                seen.append(len(text))
                return [0] * ((len(text) + 7) // 8)

        self.patch(tokens, "get_encoding", lambda name: Enc())
        return seen

    def test_slices_and_budget(self) -> None:
        """A 3M-character text is encoded in slices of at most 4096 characters, 1M in all, the rest scaled."""
        seen = self.fake_encoding()
        n = tokens.count_text("gpt-4o", "x" * 3_000_000)
        self.assertLessEqual(max(seen), 4096)
        self.assertEqual(sum(seen), 1_000_000)
        self.assertEqual(n, 375_000)

    def test_prompt_budget_across_messages(self) -> None:
        """The budget holds for a whole prompt, however it is split into messages."""
        seen = self.fake_encoding()
        body = {"messages": [{"role": "user", "content": "y" * 400_000} for _ in range(5)]}
        n = tokens.estimate_prompt_tokens("gpt-4o", body, "openai.chat")
        self.assertLessEqual(max(seen), 4096)
        self.assertEqual(sum(seen), 1_000_000)
        self.assertEqual(n, 250_000 + 5 * 3 + 3)

    def test_prose_close_to_exact(self) -> None:
        """On real text the slicing changes the count by well under 1%."""
        text = ("The quick brown fox jumps over the lazy dog; naïve café résumé 12345. " * 2000)
        exact = len(tokens.get_encoding("o200k_base").encode_ordinary(text))
        self.assertLess(abs(tokens.count_text("gpt-4o", text) / exact - 1.0), 0.01)
        self.assertNotEqual(len(text) // 4096, 0)
