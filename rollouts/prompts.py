"""Prompt sources for recorded rollouts: GSM8K on disk, local files, hub datasets, a generator.

``load_prompts(source, num_prompts, seed)`` understands:

- ``None`` or ``"gsm8k"``: the GSM8K training file named by ``$DAS_GSM8K_PATH`` (a ``.jsonl``
  or ``.parquet`` with a ``question`` column; an error if it is set but absent); when the
  variable is unset, the hub's ``openai/gsm8k`` (``datasets.load_dataset``); when the hub is
  unreachable (checked with a 3 s connection probe, so an offline machine does not wait on
  retries), the built-in generator (with a warning).
- a local ``.jsonl``/``.parquet`` path: the column ``question``, else ``prompt``, else
  ``text``; the answer from ``answer`` when present.
- ``"builtin"``: deterministic arithmetic word problems drawn from ``random.Random(seed)``.
- any other string: a ``datasets`` hub name, loaded as ``load_dataset(name, "main",
  split="train")``; if that fails (e.g. offline), the built-in generator (with a warning).

Rows are taken in file order (the first ``num_prompts``), so a source always gives the same
prompts; ``seed`` only drives the built-in generator.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollouts.jsonl import read_jsonl_objects

logger = logging.getLogger(__name__)

GSM8K_HUB_NAME = "openai/gsm8k"
GSM8K_PATH_ENV = "DAS_GSM8K_PATH"  # a local GSM8K train file used for the "gsm8k" source
HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0
BUILTIN_SOURCE = "builtin"
TEXT_COLUMNS = ("question", "prompt", "text")
LOCAL_SUFFIXES = (".jsonl", ".parquet")
GSM8K_INSTRUCTION = (
    "Solve the problem step by step. Then write the final answer on its own line as "
    '"#### <answer>".'
)


@dataclass(frozen=True)
class Prompt:
    """One prompt of the prompt set.

    Attributes:
        index: position in the source (0-based row number); a stable explicit prompt id.
        text: the question as plain text (no chat formatting).
        answer: the reference final answer if the source has one (GSM8K: the text after
            ``####``), else ``None``.
    """

    index: int
    text: str
    answer: str | None = None


def default_gsm8k_path() -> Path | None:
    """The GSM8K training file named by ``$DAS_GSM8K_PATH``, or ``None`` when it is unset/empty."""
    override = os.environ.get(GSM8K_PATH_ENV, "").strip()
    return Path(override).expanduser() if override else None


def hub_reachable(host: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` (default :data:`HUB_HOST`) port 443 opens in time.

    ``datasets.load_dataset`` retries for a long while on a machine without network; this probe
    lets an offline machine fall back at once. With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
    set, the hub is taken as reachable: ``datasets`` then reads its local cache (or fails fast).
    """
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return True
    try:
        with socket.create_connection((host or HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def format_gsm8k_messages(question: str) -> list[dict[str, str]]:
    """Chat messages asking the model to reason step by step and end with ``#### <answer>``."""
    return [{"role": "user", "content": f"{question.strip()}\n\n{GSM8K_INSTRUCTION}"}]


def final_answer(answer: Any) -> str | None:
    """The final answer of a GSM8K-style solution: the text after the last ``####``."""
    if answer is None:
        return None
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "")


def _looks_like_path(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix.lower() in (*LOCAL_SUFFIXES, ".json", ".csv", ".txt") or path.exists()


def load_prompts(source: str | None, num_prompts: int, seed: int = 0) -> list[Prompt]:
    """The first ``num_prompts`` prompts of ``source`` (see the module docstring for sources).

    Raises ``ValueError`` for a non-positive ``num_prompts``, a missing or unreadable local
    file, a file without a text column (naming the columns it has), or an empty dataset.
    Fewer prompts than asked for are returned, with a warning, when the source is smaller.
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts={num_prompts!r} must be a positive integer")
    if source is None or source.lower() == "gsm8k":
        path = default_gsm8k_path()
        if path is None:
            logger.info("%s is not set; trying the hub dataset %s", GSM8K_PATH_ENV, GSM8K_HUB_NAME)
            return _load_hub_or_builtin(GSM8K_HUB_NAME, num_prompts, seed)
        if not path.is_file():
            raise ValueError(f"{GSM8K_PATH_ENV}={str(path)!r} is not a file")
        return _take(_load_local(path), num_prompts, str(path))
    if source.lower() == BUILTIN_SOURCE:
        return builtin_prompts(num_prompts, seed)
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        return _take(_load_local(path), num_prompts, str(path))
    return _load_hub_or_builtin(source, num_prompts, seed)


def _take(rows: list[Prompt], num_prompts: int, name: str) -> list[Prompt]:
    if not rows:
        raise ValueError(f"prompt source {name} is empty: it holds no prompts")
    if len(rows) < num_prompts:
        logger.warning(
            "prompt source %s has only %d prompts (%d asked)", name, len(rows), num_prompts
        )
    return rows[:num_prompts]


def _rows_to_prompts(columns: dict[str, list[Any]], name: str) -> list[Prompt]:
    if not any(columns.values()):
        raise ValueError(f"prompt source {name} is empty: it holds no prompts")
    text_column = next((column for column in TEXT_COLUMNS if column in columns), None)
    if text_column is None:
        raise ValueError(
            f"prompt source {name} has no text column: expected one of {list(TEXT_COLUMNS)}, "
            f"found {sorted(columns)}"
        )
    answers = columns.get("answer")
    prompts = []
    for index, text in enumerate(columns[text_column]):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"prompt source {name}: row {index} column {text_column!r} is not a non-empty "
                f"string ({text!r})"
            )
        answer = final_answer(answers[index]) if answers is not None else None
        prompts.append(Prompt(index=index, text=text, answer=answer))
    return prompts


def _load_local(path: Path) -> list[Prompt]:
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ValueError(f"prompt file {path} must be one of {list(LOCAL_SUFFIXES)}")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            message = f"prompt file {path} is not a readable parquet file: {error}"
            raise ValueError(message) from error
        return _rows_to_prompts(table.to_pydict(), str(path))
    return _rows_to_prompts(_read_json_rows(path), str(path))


def _read_json_rows(path: Path) -> dict[str, list[Any]]:
    """Columns of a jsonl file (one JSON object per line); every key seen becomes a column."""
    rows = [row for _, row in read_jsonl_objects(path, "prompt file")]
    names = sorted({key for row in rows for key in row})
    return {name: [row.get(name) for row in rows] for name in names}


def _load_hub_or_builtin(name: str, num_prompts: int, seed: int) -> list[Prompt]:
    if not hub_reachable():
        logger.warning(
            "%s is unreachable (no network); using %d built-in arithmetic problems (set %s or "
            "pass a .jsonl/.parquet file for real prompts)",
            HUB_HOST,
            num_prompts,
            GSM8K_PATH_ENV,
        )
        return builtin_prompts(num_prompts, seed)
    try:
        import datasets

        dataset = datasets.load_dataset(name, "main", split="train")
    except Exception as error:  # offline, unknown name, no "main" config: all mean "unreachable"
        logger.warning(
            "could not load hub dataset %s (%s: %s); using %d built-in arithmetic problems",
            name,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            num_prompts,
        )
        return builtin_prompts(num_prompts, seed)
    head = dataset.select(range(min(num_prompts, len(dataset))))
    return _take(_rows_to_prompts(head.to_dict(), name), num_prompts, name)


# --------------------------------------------------------------------------- built-in problems

_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells")


def _builtin_problem(rng: random.Random) -> tuple[str, int]:
    """One word problem and its integer answer; every number is drawn from ``rng``."""
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        start, bags, per_bag = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12)
        text = (
            f"{name} has {start} {item}. {name} buys {bags} bags with {per_bag} {item} in "
            f"each bag. How many {item} does {name} have now?"
        )
        return text, start + bags * per_bag
    if kind == 1:
        per_day, days, given = rng.randint(3, 20), rng.randint(2, 14), rng.randint(1, 10)
        text = (
            f"{name} collects {per_day} {item} every day for {days} days, then gives away "
            f"{given} {item}. How many {item} are left?"
        )
        return text, per_day * days - given
    if kind == 2:
        friends, each = rng.randint(2, 8), rng.randint(2, 15)
        extra = rng.randint(0, friends - 1)
        total = friends * each + extra
        text = (
            f"{name} shares {total} {item} equally among {friends} friends and keeps the "
            f"{item} that are left over. How many {item} does each friend get?"
        )
        return text, each
    price, count = rng.randint(2, 15), rng.randint(2, 10)
    paid = price * count + rng.randint(1, 50)
    text = (
        f"One box of {item} costs ${price}. {name} buys {count} boxes and pays with ${paid}. "
        f"How much change does {name} get?"
    )
    return text, paid - price * count


def builtin_prompts(num_prompts: int, seed: int = 0) -> list[Prompt]:
    """Deterministic arithmetic word problems: the same ``seed`` always gives the same list.

    The list for ``n`` prompts is a prefix of the list for ``n + 1`` (one stream per seed).
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts={num_prompts!r} must be a positive integer")
    rng = random.Random(seed)
    prompts = []
    for index in range(num_prompts):
        text, answer = _builtin_problem(rng)
        prompts.append(Prompt(index=index, text=text, answer=str(answer)))
    return prompts
