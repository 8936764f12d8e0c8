"""Text in and out of a generator: prompts and chat transcripts to token ids, and generated ids back
to text as they stream, with stop strings.

transformers' tokenizer does the work (its chat template, its decoding); this module adds what a
server needs around it: a fallback template for tokenizers that have none (random-weight models,
base models), detokenisation that never emits half a character, and stop strings that end a
sequence the step they appear, even when they straddle two events.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from app.config import ModelSpec
from app.models.loader import tokenizer_dir

# What a tokenizer without a chat template gets: a plain transcript that ends with the turn the
# model is to write. (Random-weight models write noise whatever the template.)
PLAIN_TRANSCRIPT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class GenerationText:
    def __init__(self, spec: ModelSpec):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(spec)), use_fast=True)
        g = spec.generation
        self.template = g.chat_template or getattr(self.tok, "chat_template", None) or PLAIN_TRANSCRIPT
        self.default_stop = list(g.stop)

    def __len__(self) -> int:
        return len(self.tok)

    def eos_token_ids(self, model_config: Any) -> list[int]:
        """End-of-sequence ids: the model's (its config or generation config) and the tokenizer's;
        a BERT-style tokenizer under a random-weight model ends on its separator."""
        ids: list[int] = []
        for value in (getattr(model_config, "eos_token_id", None), self.tok.eos_token_id,
                      None if self.tok.eos_token_id is not None else self.tok.sep_token_id):
            if value is None:
                continue
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        return sorted(set(int(i) for i in ids if i is not None and int(i) >= 0))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tok(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tok.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                            add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decoder(self, stop: Optional[Sequence[str]] = None) -> "StreamDecoder":
        return StreamDecoder(self.tok, list(stop) if stop else self.default_stop)


class StreamDecoder:
    """Generated ids to text deltas. The whole generation is decoded each time (tokenizers merge
    pieces across token boundaries), and text is released only when it can no longer change: not
    while it ends in an incomplete character, nor while it ends in the beginning of a stop string."""

    def __init__(self, tok: Any, stop: list[str]):
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        """The text `new_ids` add (all of what is held back, when `final`). After a stop string is
        seen, `stopped` is set and the text up to it is the last delta."""
        self.ids.extend(new_ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.stopped = True
                text = text[:at]
                final = True
        if not final:
            hold = len(text)
            if text.endswith("\ufffd"):  # a multi-byte character not complete yet
                hold = len(text.rstrip("\ufffd"))
            for s in self.stop:  # a stop string may be starting
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = min(hold, len(text) - k)
                        break
            text = text[:hold]
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta
