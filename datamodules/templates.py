"""Conversation templates (``plain`` and ``vicuna_v1``) and the label mask, computed from character spans.

A template renders a LLaVA conversation record into one string and records the character span of every
piece the model must learn to produce (each assistant reply plus the separator that ends it). Tokenising
the whole string once with offsets, a token is a target when its text (leading whitespace dropped) lies
inside a target span. Nothing is re-tokenised piece by piece and counted, which is how LLaVA silently
zeroes the labels of samples with a "tokenization mismatch". The ``<image>`` placeholder is one special
token here; it is expanded to the encoder's visual tokens afterwards (see ``lmm.preprocess``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ConversationError(ValueError):
    """A conversation record that cannot be rendered (no assistant turn, roles out of order, ...)."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the text and the half-open character spans that carry the loss."""

    text: str
    target_spans: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat format. ``plain``: image + caption + newline (pretraining). ``vicuna_v1``: LLaVA-1.5 chat."""

    name: str
    system: str = ""
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "  # after the system line and after each user message
    sep2: str = "</s>"  # ends each assistant message (and carries loss)
    #: Where the image goes in the first user turn: before the question (LLaVA's ``<image>\n`` + question) or
    #: after it (question + ``\n<image>``), so that every image token can see what is asked.
    image_first: bool = True

    @property
    def stop_text(self) -> str:
        """The text that ends a reply: generation stops there (plain captions end with a newline)."""
        return "\n" if self.name == "plain" else self.sep2

    def render(self, conversation: Sequence[dict], has_image: bool) -> Rendered:
        """Render a training conversation (LLaVA ``conversations`` list: ``{"from", "value"}`` turns)."""
        turns = normalise_turns(conversation, has_image, self.image_first)
        if self.name == "plain":
            return self._render_plain(turns, has_image)
        text = self.system + self.sep if self.system else ""
        spans = []
        for user_msg, reply in turns:
            text += f"{self.user}: {user_msg}{self.sep}{self.assistant}: "
            start = len(text)
            text += reply + self.sep2
            spans.append((start, len(text)))
        return Rendered(text, tuple(spans))

    def prompt(self, question: str, has_image: bool) -> str:
        """The generation prompt for one user question; the model continues after the assistant role."""
        if has_image:
            question = place_image(question, self.image_first)
        if self.name == "plain":
            return IMAGE_PLACEHOLDER if has_image else ""
        head = self.system + self.sep if self.system else ""
        return f"{head}{self.user}: {question}{self.sep}{self.assistant}:"

    def _render_plain(self, turns: list[tuple[str, str]], has_image: bool) -> Rendered:
        # LLaVA's preprocess_plain: the human turn is replaced by the bare image; loss on caption + "\n".
        if not has_image:
            raise ConversationError("the plain template needs an image")
        caption = turns[0][1]
        text = IMAGE_PLACEHOLDER
        start = len(text)
        text += caption + "\n"
        return Rendered(text, ((start, len(text)),))


TEMPLATES: dict[str, Template] = {
    "plain": Template(name="plain"),
    "vicuna_v1": Template(name="vicuna_v1", system=VICUNA_SYSTEM),
    "vicuna_v1_question_first": Template(
        name="vicuna_v1_question_first", system=VICUNA_SYSTEM, image_first=False
    ),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; expected one of {sorted(TEMPLATES)}") from None


def place_image(user_text: str, image_first: bool = True) -> str:
    """``user_text`` with its image placeholder (added when missing) at its start (``<image>\\n`` + text, LLaVA's)
    or, ``image_first=False``, at its end (text + ``\\n<image>``)."""
    text = user_text.replace(IMAGE_PLACEHOLDER, "").strip()
    return IMAGE_PLACEHOLDER + "\n" + text if image_first else text + "\n" + IMAGE_PLACEHOLDER


def normalise_turns(
    conversation: Sequence[dict], has_image: bool, image_first: bool = True
) -> list[tuple[str, str]]:
    """Check a LLaVA conversation and return (user, assistant) pairs with ``<image>\\n`` leading turn one
    (``image_first=False``: ``\\n<image>`` ending it).

    Like LLaVA, a placeholder anywhere in the first user turn is moved to its start; placeholders in later
    turns, or in a sample without an image, are errors rather than silently dropped text.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ConversationError("conversation is empty or not a list")
    turns = list(conversation)
    if turns and _role(turns[0]) not in HUMAN_ROLES:  # LLaVA skips a leading non-human turn
        turns = turns[1:]
    if len(turns) < 2:
        raise ConversationError("conversation has no assistant turn")
    if len(turns) % 2:
        turns = turns[:-1]  # a trailing unanswered question carries no target
    pairs = []
    for i in range(0, len(turns), 2):
        user, reply = turns[i], turns[i + 1]
        if _role(user) not in HUMAN_ROLES or _role(reply) not in ASSISTANT_ROLES:
            raise ConversationError(f"turn {i} is not a human/assistant pair ({_role(user)}, {_role(reply)})")
        user_text, reply_text = _value(user), _value(reply)
        if IMAGE_PLACEHOLDER in reply_text or (i > 0 and IMAGE_PLACEHOLDER in user_text):
            raise ConversationError(f"{IMAGE_PLACEHOLDER} outside the first user turn")
        if i == 0:
            if has_image:
                user_text = place_image(user_text, image_first)
            elif IMAGE_PLACEHOLDER in user_text:
                raise ConversationError(f"{IMAGE_PLACEHOLDER} in a sample without an image")
        if not reply_text.strip():
            raise ConversationError(f"turn {i + 1} is an empty assistant reply")
        pairs.append((user_text, reply_text))
    return pairs


def _role(turn: dict) -> str:
    if not isinstance(turn, dict) or "from" not in turn:
        raise ConversationError("a turn is not a {'from', 'value'} object")
    return str(turn["from"]).lower()


def _value(turn: dict) -> str:
    value = turn.get("value")
    if not isinstance(value, str):
        raise ConversationError("a turn's 'value' is not a string")
    return value
