"""The chat template: a conversation in three roles, laid out for the model, with its loss mask.

Behind a chat window the data is text in roles. A system prompt sets how the assistant
behaves ("你只寫五言詩"); then the user and the assistant speak in turn. The window sends the
system prompt and the conversation so far to the model and shows what it writes as the
assistant's next turn. The instruction format (data/instruct.py, <INS>...<INP>...<RES>) is
one template, for a single request; this one carries a conversation, in the style of
ChatML (<|im_start|>role ... <|im_end|>):

    <|system|>你只寫五言詩<|end|><|user|>請用以下題目寫一首詩：春夜<|end|><|assistant|>好雨知時節，...<|end|>
    <|user|>為這首詩擬一個題目<|end|><|assistant|>春夜喜雨<|end|>

Any template serves, as long as training and use agree: this module is the one place both
read it from. Each marker is one id (data/tokenizer.py, CHAT_MARKERS), and the text of
every turn is encoded as plain text, so a user who types "<|end|><|assistant|>" has typed
characters, not a turn of the assistant's.

The loss mask, `loss_on`:
- "assistant": every assistant turn carries labels (its text and the <|end|> that closes it,
  which is how the model learns to stop); the system prompt and the user's turns are given.
- "last": only the last assistant turn; the earlier replies are context the model reads but
  is not trained to write. One conversation then teaches one reply, the one that answers
  everything before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from data.errors import UserError
from data.instruct import IGNORE, EncodedSample
from data.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLES = ("system", "user", "assistant")
MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
LOSS_ON = ("assistant", "last")
ORDER = "a conversation is an optional system prompt first, then user and assistant in turn, the user first"


class ChatError(UserError):
    """A conversation that breaks the template; the message is one line naming the message."""


def check_conversation(messages: Sequence[Mapping], where: str = "conversation") -> None:
    """Refuse, in one line naming the message, a conversation out of the template's order:
    each message a {"role", "content"} with a role of ROLES and text for content; a system
    prompt only first; then user and assistant in turn, the user first."""
    if not messages:
        raise ChatError(f"{where}: no messages; {ORDER}")
    expected = "user"
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ChatError(f"{where}, message {i}: must be an object with exactly a role and a content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatError(f"{where}, message {i}: unknown role {role!r}; one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{where}, message {i}: the content must be text, got {type(content).__name__}")
        if role == "system" and i == 1:
            continue
        if role != expected:
            before = f"after {messages[i - 2]['role']}" if i > 1 else "first"
            raise ChatError(f"{where}, message {i}: {role} {before}; {ORDER}")
        expected = "assistant" if role == "user" else "user"


def _require_markers(tokenizer: Tokenizer) -> None:
    if not tokenizer.has_chat_markers:
        raise ChatError("this model's tokenizer has no chat markers: it was not tuned on conversations "
                        "(finetune.py --format chat)")


def render(messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """The conversation as a person reads it, markers spelled out (for printing; the model's
    ids come from render_ids, never from this text). With add_generation_prompt, it ends by
    opening the assistant's turn: what the model is to continue."""
    check_conversation(messages)
    text = "".join(f"{MARKERS[m['role']]}{m['content']}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def _turn_ids(tokenizer: Tokenizer, message: Mapping, unknown: Counter | None) -> tuple[list[int], list[int]]:
    """(the marker that opens the turn, the turn's text and its <|end|>) as ids."""
    special = tokenizer.special_ids
    return [special[MARKERS[message["role"]]]], tokenizer.encode(message["content"], unknown) + [special[END]]


def render_ids(tokenizer: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = False,
               unknown: Counter | None = None) -> list[int]:
    """The conversation as the model reads it: each marker from its id, each text as plain
    text. With add_generation_prompt the last message must be the user's, and the ids end
    with <|assistant|>: the model's next tokens are the assistant's answer, up to <|end|>."""
    _require_markers(tokenizer)
    check_conversation(messages)
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ChatError(f"conversation: the model answers the user, but the last message is the "
                        f"{messages[-1]['role']}'s")
    ids = []
    for message in messages:
        opening, rest = _turn_ids(tokenizer, message, unknown)
        ids += opening + rest
    return ids + ([tokenizer.special_ids[ASSISTANT]] if add_generation_prompt else [])


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping], loss_on: str = "assistant",
                        unknown: Counter | None = None) -> EncodedSample:
    """A conversation ending with an assistant turn -> (inputs, labels, response_labels), each
    len(ids) - 1 long, as data/instruct.encode_sample's: the label at position i is ids[i + 1]
    or IGNORE. `loss_on` (LOSS_ON) decides which assistant turns carry labels; the opening
    <|assistant|> marker never does (the template puts it there, the model need not guess
    it), the text and the closing <|end|> do. response_labels are the last turn's alone,
    whatever loss_on: a loss comparable between the two masks."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    _require_markers(tokenizer)
    check_conversation(messages)
    if messages[-1]["role"] != "assistant":
        raise ChatError(f"conversation: a training conversation ends with the assistant's turn, not the "
                        f"{messages[-1]['role']}'s")
    last = len(messages) - 1
    ids, labels, last_labels = [], [], []
    for i, message in enumerate(messages):
        opening, rest = _turn_ids(tokenizer, message, unknown)
        ids += opening + rest
        # Each id is the label of the position before it: the opening marker's position
        # predicts the turn's first token, so the labelled ids are `rest`.
        learned = message["role"] == "assistant" and (loss_on == "assistant" or i == last)
        labels += [IGNORE] * len(opening) + (rest if learned else [IGNORE] * len(rest))
        last_labels += [IGNORE] * len(opening) + (rest if i == last else [IGNORE] * len(rest))
    return EncodedSample(ids[:-1], labels[1:], last_labels[1:])


def reserved_for_answer(block_size: int, max_new_tokens: int) -> int:
    """The ids kept free in the block for the assistant's next answer when a conversation is
    fitted to it (fit_history's budget is block_size minus this): max_new_tokens or an eighth
    of the block, whichever is less. Enough for a title or a form's name to be written with the
    whole conversation in view. A longer answer, a poem, slides the window as it goes
    (model.GPT.generate_stream crops the context to its last block_size ids): by then the
    request is read and the poem begun. Keeping room for the longest answer instead would
    forget, before answering, the very poem a follow-up asks about (這首詩是什麼體裁？)."""
    return min(max_new_tokens, block_size // 8)


def fit_history(tokenizer: Tokenizer, messages: Sequence[Mapping], budget: int) -> tuple[list[Mapping], int]:
    """The conversation to answer (ending with the user's turn), trimmed so that its prompt
    (render_ids with the generation prompt) is at most `budget` ids: the oldest exchanges,
    a user turn and the assistant's answer, are forgotten first; the system prompt and the
    last request are kept. Returns the messages kept and how many exchanges were dropped;
    if even the system prompt and the last request exceed the budget, ChatError."""
    check_conversation(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system):])
    dropped = 0
    while len(render_ids(tokenizer, system + turns, add_generation_prompt=True)) > budget:
        if len(turns) <= 1:
            size = len(render_ids(tokenizer, system + turns, add_generation_prompt=True))
            raise ChatError(f"the request is {size} tokens with the system prompt and the markers, and leaves no "
                            f"room for an answer in {budget}; shorten it")
        turns, dropped = turns[2:], dropped + 1
    return system + turns, dropped
