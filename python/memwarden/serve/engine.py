"""What the server generates with: a transformers causal LM and its tokenizer, token by
token into a :class:`memwarden.kv.PagedCache` per request (attention over the pages in
place), so every step can be streamed, counted and stopped; several requests at once in
their own threads.

``load_engine(None)`` is the embedded model: a tiny Llama with random weights (a fixed
seed) over a byte-level tokenizer, so ``memwarden serve`` runs with no download (its text
is noise). ``load_engine(PATH)`` loads a local model folder or a Hub id with
``AutoModelForCausalLM``/``AutoTokenizer``.

May import: transformers, torch, :mod:`memwarden.kv` and the bottom layers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from memwarden.kv import PagedCache, PagedKVCache
from memwarden.kv.attention import ATTENTION_NAME

__all__ = ["ByteTokenizer", "Engine", "load_engine"]

EMBEDDED_NAME = "memwarden-tiny-random"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then BOS, EOS and PAD: needs no vocabulary file."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(text)


def _embedded_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = ByteTokenizer()
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tok


@dataclass
class Step:
    """One generated token: its id and the text it completes (may be empty mid-UTF-8);
    ``token`` None: the last piece of text, after the last token."""

    token: Optional[int]
    text: str


class Engine:
    """A model and its tokenizer: :meth:`generate` runs up to ``max_concurrency`` requests
    at once (each in its caller's thread, each with its own cache; admission decides how
    many may hold memory, this bounds how many compute)."""

    def __init__(self, model, tokenizer, name: str, kv_dtype: str = "auto", max_concurrency: int = 4):
        self.model, self.tokenizer, self.name, self.kv_dtype = model, tokenizer, name, kv_dtype
        model.set_attn_implementation(ATTENTION_NAME)
        config = model.config.get_text_config(decoder=True)
        self.max_context = getattr(config, "max_position_embeddings", None) or 4096
        self.vocab_size = config.vocab_size
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dtype = next(model.parameters()).dtype
        store = PagedKVCache(config.num_hidden_layers, kv_heads, head_dim, dtype=dtype, page_size=16, kv_dtype=kv_dtype)
        # KV bytes of one token, every layer, K and V: what admission prices a request at
        self.bytes_per_token = store.page_bytes("q" if kv_dtype != "auto" else "fp") // store.page_size
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self._slots = _Limit(max_concurrency)
        # one prefill at a time, as engines bound the tokens of a step: its activations (the
        # prompt's attention scores) are then those of one prompt, however many requests run
        self._prefill = threading.Lock()
        self.created = int(time.time())

    def set_concurrency(self, limit: int) -> None:
        """Requests generating at once from now on (at least 1)."""
        self._slots.set(limit)

    @property
    def concurrency(self) -> int:
        return self._slots.limit

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.apply_chat_template(messages)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding is not a dict

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None, logit_bias: Optional[dict[int, float]] = None,
                 output: Sequence[int] = (), shown: int = 0) -> Iterator[Step]:
        """Tokens one by one (greedy at temperature 0, else nucleus sampling), until
        ``max_tokens`` in all or the end-of-sequence token, which is not yielded; the text
        is held back while it ends inside a multi-byte character, and flushed at the end.

        ``logit_bias`` (token id -> bias) is added to the logits before sampling.
        ``output``: tokens this request generated before it was preempted, of whose text
        ``shown`` characters were yielded; they are recomputed with the prompt and the text
        continues from there."""
        generator = torch.Generator().manual_seed(
            (seed if seed is not None else time.time_ns()) % (2**63) + len(output))
        bias = None
        if logit_bias:
            bias = torch.zeros(self.vocab_size)
            bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()))
        with self._slots, torch.no_grad():
            # no budget of its own (admission keeps the pool's), so never compressed under pressure
            cache = PagedCache(self.model.config, kv_dtype=self.kv_dtype, history=0,
                               compress="never" if self.kv_dtype == "auto" else "always")
            context = list(prompt) + list(output)
            with self._prefill:
                logits = self.model(torch.tensor([context]), past_key_values=cache, use_cache=True,
                                    logits_to_keep=1).logits[0, -1]  # not the whole prompt's logits
            produced = list(output)
            done = self.tokenizer.decode(produced)[:shown] if produced else ""  # the text yielded so far
            for _ in range(max_tokens - len(produced)):
                scores = logits.float() if bias is None else logits.float() + bias
                token = _sample(scores, temperature, top_p, generator)
                if token == self.eos:
                    break
                produced.append(token)
                text = self.tokenizer.decode(produced)
                if text.endswith("\ufffd"):  # maybe the start of a multi-byte character: wait
                    yield Step(token, "")
                else:
                    yield Step(token, text[len(done):])
                    done = text
                logits = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
            rest = self.tokenizer.decode(produced)[len(done):]
            if rest:  # bytes that never became a character
                yield Step(None, rest)


class _Limit:
    """A semaphore whose limit can change while it is held (degradation shrinks the batch
    under pressure): a lower limit lets the running finish and admits no one until they do."""

    def __init__(self, limit: int):
        self.limit, self._held = limit, 0
        self._changed = threading.Condition()

    def set(self, limit: int) -> None:
        with self._changed:
            self.limit = max(1, limit)
            self._changed.notify_all()

    def __enter__(self):
        with self._changed:
            self._changed.wait_for(lambda: self._held < self.limit)
            self._held += 1

    def __exit__(self, *exc):
        with self._changed:
            self._held -= 1
            self._changed.notify_all()


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def load_engine(model: Optional[str] = None, kv_dtype: str = "auto", max_concurrency: int = 4) -> Engine:
    """The embedded tiny model (``model=None``) or a local folder / Hub id."""
    if model is None:
        lm, tokenizer = _embedded_model()
        return Engine(lm, tokenizer, EMBEDDED_NAME, kv_dtype, max_concurrency)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    return Engine(lm, tokenizer, model, kv_dtype, max_concurrency)
