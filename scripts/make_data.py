#!/usr/bin/env python3
"""Build the Grimm tales dataset (JSONL of {"title", "story"}) from Project Gutenberg eBook #2591.

The book is downloaded (or read from --source, a local copy) and checked against a pinned sha256; the
Gutenberg licence header and footer and the afterword are dropped and the text is split at the tale titles
listed in the book's own table of contents. The held-out tales for evaluation are chosen from this file by
a hash of each title (scripts/lib/tales.py), so every machine holds out the same ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import UserError, atomic_file, log, run_main  # noqa: E402

URL = "https://www.gutenberg.org/cache/epub/2591/pg2591.txt"
SHA256 = "4d909d18d528fbf393a06ecc05487006d6983f69d55a16138e4bc7642213eb90"
# parts of a tale, listed in the contents beside the tales themselves
SUB_HEADINGS = re.compile(r"^(\d+\. .*|FIRST STORY|SECOND STORY)$")
SMALL_WORDS = {"a", "an", "and", "the", "of", "in", "on", "to", "who", "what", "at", "for", "or"}


def fetch(source: str) -> bytes:
    if re.match(r"https?://", source):
        log(f"downloading {source}")
        try:
            with urllib.request.urlopen(source, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise UserError(f"cannot download {source} ({e}); offline, pass GUTENBERG_TXT=path/to/pg2591.txt") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        data = path.read_bytes()
    return data


def title_case(heading: str) -> str:
    words = heading.split(" ")
    return " ".join(w.capitalize() if i == 0 or w.lower() not in SMALL_WORDS else w.lower()
                    for i, w in enumerate(words))


def split_book(text: str) -> list[dict]:
    text = text.replace("\r\n", "\n")
    start = text.find("*** START OF THIS PROJECT GUTENBERG EBOOK")
    end = text.find("*** END OF THIS PROJECT GUTENBERG EBOOK")
    if start < 0 or end < 0:
        raise UserError("no Gutenberg START/END markers: is this eBook #2591?")
    body = text[text.index("\n", start) + 1:end]
    contents = body.index("CONTENTS:")
    titles, lines = [], body[contents:].split("\n")[1:]
    for i, line in enumerate(lines):
        if line.startswith("     ") and not line.startswith("      ") and line.strip().isupper() \
                and not SUB_HEADINGS.match(line.strip()):
            titles.append(line.strip())
        elif titles and not line.strip() and not any(l.strip() for l in lines[i:i + 3]):
            break  # the contents end at the first run of blank lines after them
    afterword = body.rfind("\n*****\n")
    body = body[:afterword] if afterword > 0 else body
    positions = []
    pos = contents
    for title in titles:
        m = re.compile(rf"^{re.escape(title)}$", re.M).search(body, pos + 1)
        if not m:
            raise UserError(f"tale {title!r} is listed in the contents but not found in the text")
        positions.append((m.start(), m.end()))
        pos = m.end()
    tales = []
    for (s, e), title, (nxt, _) in zip(positions, titles, positions[1:] + [(len(body), 0)]):
        story = re.sub(r"\n{3,}", "\n\n", body[e:nxt].strip())  # one blank line between paragraphs
        tales.append({"title": title_case(title), "story": story})
    return tales


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=URL, help="URL or local path of pg2591.txt (default: %(default)s)")
    p.add_argument("--sha256", default=SHA256, help="expected sha256 of the book (default: the 2008 edition)")
    p.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    args = p.parse_args()
    data = fetch(args.source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != args.sha256:
        raise UserError(f"{args.source} has sha256 {digest}, expected {args.sha256}: not the pinned edition")
    tales = split_book(data.decode("utf-8-sig"))
    with atomic_file(args.out) as tmp:
        tmp.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tales), encoding="utf-8")
    log(f"wrote {args.out}: {len(tales)} tales, {sum(len(t['story']) for t in tales):,} characters of story text")


if __name__ == "__main__":
    run_main(main)
