"""docs/protocol.md is normative: it and runtime/protocol.py must list the same messages, fields,
field types, required fields and error codes."""

from __future__ import annotations

import re
from pathlib import Path

from sftool.runtime.protocol import MESSAGE_CLASSES, ErrorCode, MsgType

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^### ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] for p in parts}


def first_table(body: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``body`` (its consecutive ``|`` lines, header and rule skipped)."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append(line)
    return [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in block[2:]]


def test_every_message_type_is_documented_with_the_same_fields():
    docs = sections()
    assert set(docs) >= {t.value for t in MsgType}
    for msg_type, cls in MESSAGE_CLASSES.items():
        body = docs[msg_type.value]
        fields = cls.wire_fields()
        if not fields:
            assert "No fields." in body, msg_type
            continue
        table = first_table(body)
        documented = {row[0]: (row[1], row[2].startswith("yes")) for row in table}
        code = {f.name: (f.metadata["kind"], f.metadata["required"]) for f in fields}
        assert documented == code, msg_type


def test_the_error_codes_are_the_same():
    body = DOC.read_text().split("## 7. Error codes", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in body.splitlines() if re.match(r"^\| \d+ \|", line)]
    documented = {int(r[0]): r[1].strip().strip("`") for r in rows}
    assert documented == {int(c): c.name for c in ErrorCode}
