"""The Grimm tales dataset: reading and checking the JSONL, the held-out split, and the one prompt format.

The same `chat_messages` is used to train, is saved as the checkpoint's chat template, and is what the
server applies to /v1/chat/completions requests, so training and serving see identical prompts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lib.common import UserError

# For bases without a chat template of their own (e.g. Llama 2 base): a plain Human/Assistant format,
# spelled the same way in training and at inference (the seed trained on "###Assisstant:" and then
# prompted with "###Assistant:").
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"
)
MIN_STORY_CHARS = 200


def load_tales(path: Path) -> list[dict]:
    """[{title, story}] from a JSONL file; malformed lines are reported with their line number."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset {path} does not exist")
    tales = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("title"), str) or not isinstance(
                    row.get("story"), str):
                raise UserError(f"{path}:{n}: expected an object with string fields 'title' and 'story'")
            tales.append({"title": row["title"].strip(), "story": row["story"].strip()})
    if not tales:
        raise UserError(f"dataset {path} is empty")
    usable = [t for t in tales if len(t["story"]) >= MIN_STORY_CHARS]
    if not usable:
        raise UserError(f"dataset {path}: no tale has a story of at least {MIN_STORY_CHARS} characters")
    return usable


def is_held_out(title: str, every: int = 10) -> bool:
    """About one tale in `every`, chosen by a hash of its title: stable across runs and machines."""
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % every == 0


def split_tales(tales: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [t for t in tales if not is_held_out(t["title"])]
    held = [t for t in tales if is_held_out(t["title"])]
    if not train:  # tiny datasets: keep something to train on
        train, held = held, []
    return train, held


def user_prompt(title: str) -> str:
    return f"Tell me the Grimm fairy tale \"{title}\"."


def chat_messages(tale: dict) -> list[dict]:
    return [{"role": "user", "content": user_prompt(tale["title"])},
            {"role": "assistant", "content": tale["story"]}]
