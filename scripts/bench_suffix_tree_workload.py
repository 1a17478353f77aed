"""Workload of ``bench_suffix_tree.py``: RL-like prompt groups, the engine's call pattern, and a
brute-force n-gram oracle that judges drafts independently of both trees."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_suffix_tree")

GSM8K_PATH_ENV = "DAS_GSM8K_PATH"  # the GSM8K train.jsonl of the default workload
CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------- workload
@dataclass
class Workload:
    """Sequences grouped by prompt: ``sequences[i]`` = prompt + response, ``prompt_lens[i]``."""

    groups: list[list[int]]  # sequence indices of each prompt group
    sequences: list[np.ndarray]  # int32, contiguous
    prompt_lens: list[int]
    unseen: list[np.ndarray]  # sequences never inserted (contexts for "unseen" speculation)
    unseen_prompt_lens: list[int]
    source: str

    @property
    def num_tokens(self) -> int:
        return int(sum(s.size for s in self.sequences))


def gsm8k_data_path(path: Path | None = None) -> Path:
    """``path``, else ``$DAS_GSM8K_PATH``; exits naming both when neither gives a file."""
    if path is None:
        override = os.environ.get(GSM8K_PATH_ENV, "").strip()
        path = Path(override).expanduser() if override else None
    if path is None or not path.is_file():
        raise SystemExit(
            f"the GSM8K workload needs a GSM8K train.jsonl: set {GSM8K_PATH_ENV} (now "
            f"{os.environ.get(GSM8K_PATH_ENV)!r}) or pass --trace PATH for a recorded trace"
        )
    return path


def bench_cache_dir() -> Path:
    base = os.environ.get("DAS_CACHE_DIR", Path.home() / ".cache" / "das")
    path = Path(base) / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_gsm8k_tokens(data_path: Path) -> dict[str, np.ndarray]:
    """Chat-templated questions and answers, tokenized with the default model's tokenizer.

    Cached as an npz keyed by the data file's size/mtime and the tokenizer folder.
    """
    from das.default_model import ensure_default_model

    model_dir = ensure_default_model()
    stat = data_path.stat()
    key = f"{CACHE_FORMAT}|{data_path}|{stat.st_size}|{stat.st_mtime_ns}|{model_dir.name}"
    cache = bench_cache_dir() / f"gsm8k_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {name: data[name] for name in data.files}
    from transformers import AutoTokenizer

    logger.info("tokenizing %s once (cache: %s)", data_path, cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]
    answers = [row["answer"] + tokenizer.eos_token for row in rows]
    out: dict[str, np.ndarray] = {}
    for name, texts in (("prompt", prompts), ("answer", answers)):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        out[f"{name}_tokens"] = np.concatenate([np.asarray(x, np.int32) for x in ids])
        out[f"{name}_offsets"] = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
    tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out


def _ragged(tokens: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    return tokens[offsets[i] : offsets[i + 1]]


def perturb(
    reference: np.ndarray, donors: Callable[[], np.ndarray], rng: np.random.Generator, rate: float
) -> np.ndarray:
    """``reference`` with splices: at rate ``rate`` per token, 1-8 donor tokens replace 0-4."""
    splice_at = np.flatnonzero(rng.random(reference.size) < rate)
    pieces = []
    position = 0
    for at in splice_at:
        if at < position:
            continue
        pieces.append(reference[position:at])
        donor = donors()
        start = int(rng.integers(0, max(1, donor.size - 1)))
        pieces.append(donor[start : start + int(rng.integers(1, 9))])
        position = at + int(rng.integers(0, 5))
    pieces.append(reference[position:])
    return np.concatenate(pieces).astype(np.int32)


def gsm8k_workload(
    num_prompts: int,
    seqs_per_prompt: int,
    num_unseen: int,
    divergence: float,
    seed: int,
    data_path: Path | None = None,
) -> Workload:
    """GSM8K groups from ``data_path`` (default: ``$DAS_GSM8K_PATH``, see gsm8k_data_path)."""
    data = load_gsm8k_tokens(gsm8k_data_path(data_path))
    num_rows = data["prompt_offsets"].size - 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_rows)
    if num_prompts + num_unseen > num_rows:
        raise ValueError(f"num_prompts + unseen prompts must be <= {num_rows}")

    def donor() -> np.ndarray:
        return _ragged(data["answer_tokens"], data["answer_offsets"], int(rng.integers(num_rows)))

    def group(row: int) -> tuple[np.ndarray, list[np.ndarray]]:
        prompt = _ragged(data["prompt_tokens"], data["prompt_offsets"], row)
        answer = _ragged(data["answer_tokens"], data["answer_offsets"], row)
        return prompt, [perturb(answer, donor, rng, divergence) for _ in range(seqs_per_prompt)]

    workload = Workload([], [], [], [], [], f"gsm8k x{seqs_per_prompt} (divergence {divergence})")
    for row in order[:num_prompts]:
        prompt, responses = group(int(row))
        first = len(workload.sequences)
        workload.groups.append(list(range(first, first + len(responses))))
        for response in responses:
            workload.sequences.append(np.ascontiguousarray(np.concatenate([prompt, response])))
            workload.prompt_lens.append(prompt.size)
    for row in order[num_prompts : num_prompts + num_unseen]:
        prompt, responses = group(int(row))
        workload.unseen.append(np.concatenate([prompt, responses[0]]).astype(np.int32))
        workload.unseen_prompt_lens.append(prompt.size)
    return workload


def trace_workload(path: Path, num_prompts: int, seed: int) -> Workload:
    """Groups of a recorded rollout parquet; 10% of the prompt keys (at least 1) stay unseen."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = set(table.column_names)
    if not {"prompt_key", "response_tokens"} <= columns:
        raise ValueError(f"{path} needs columns prompt_key, response_tokens; has {sorted(columns)}")
    keys = table.column("prompt_key").to_pylist()
    responses = table.column("response_tokens").to_pylist()
    prompts = table.column("prompt_tokens").to_pylist() if "prompt_tokens" in columns else None
    by_key: dict[object, list[int]] = {}
    for row, key in enumerate(keys):
        by_key.setdefault(key, []).append(row)
    key_order = list(by_key)
    if len(key_order) < 2:
        raise ValueError(f"{path} holds {len(key_order)} prompt key(s); need >= 2")
    np.random.default_rng(seed).shuffle(key_order)
    num_unseen = max(1, len(key_order) // 10)
    stored = key_order[num_unseen:][:num_prompts]
    workload = Workload([], [], [], [], [], f"trace {path.name}")

    def sequence(row: int) -> tuple[np.ndarray, int]:
        prompt = np.asarray(prompts[row] if prompts else [], np.int32)
        response = np.asarray(responses[row], np.int32)
        return np.ascontiguousarray(np.concatenate([prompt, response])), prompt.size

    for key in stored:
        first = len(workload.sequences)
        for row in by_key[key]:
            tokens, prompt_len = sequence(row)
            workload.sequences.append(tokens)
            workload.prompt_lens.append(prompt_len)
        workload.groups.append(list(range(first, len(workload.sequences))))
    for key in key_order[:num_unseen]:
        tokens, prompt_len = sequence(by_key[key][0])
        workload.unseen.append(tokens)
        workload.unseen_prompt_lens.append(prompt_len)
    return workload


# ---------------------------------------------------------------------------------- op lists
def bulk_ops(workload: Workload) -> list[tuple[int, np.ndarray]]:
    """One call per sequence, prompt and response together."""
    return [(i, workload.sequences[i]) for group in workload.groups for i in group]


def prompt_ops(workload: Workload) -> list[tuple[int, np.ndarray]]:
    return [
        (i, workload.sequences[i][: workload.prompt_lens[i]])
        for group in workload.groups
        for i in group
    ]


@dataclass
class EngineStep:
    """One decode step of the batch: a chunk for each sequence that is still generating."""

    seq_ids: np.ndarray  # int64
    chunks: list[np.ndarray]  # per row, views into the sequences
    contexts: list[np.ndarray]  # per row, the last max_depth + 1 tokens before the chunk
    tokens: np.ndarray  # int32, the chunks concatenated (the batch APIs' input)
    offsets: np.ndarray  # int64, rows + 1


def engine_steps(workload: Workload, chunk: int, max_depth: int) -> list[EngineStep]:
    """The engine's pattern after the prompts: per step, the next ``chunk`` response tokens of
    every sequence still generating, round-robin over the whole batch.

    A row's context is the last ``max_depth + 1`` tokens before its chunk: arctic never matches
    a whole context, so the extra token lets both trees match up to ``max_depth``.
    """
    steps = []
    members = [i for group in workload.groups for i in group]
    longest = max(workload.sequences[i].size - workload.prompt_lens[i] for i in members)
    for offset in range(0, longest, chunk):
        seq_ids, chunks, contexts = [], [], []
        for group in workload.groups:
            for i in group:
                sequence = workload.sequences[i]
                begin = workload.prompt_lens[i] + offset
                if begin < sequence.size:
                    seq_ids.append(i)
                    chunks.append(sequence[begin : begin + chunk])
                    contexts.append(sequence[max(0, begin - max_depth - 1) : begin])
        steps.append(
            EngineStep(
                np.asarray(seq_ids, np.int64),
                chunks,
                contexts,
                np.concatenate(chunks),
                np.cumsum([0] + [c.size for c in chunks]).astype(np.int64),
            )
        )
    return steps


def engine_ops(workload: Workload, steps: list[EngineStep], with_context: bool) -> list[tuple]:
    """The steps flattened to one call per sequence and step: ``(seq_id, tokens)``, or with
    ``with_context`` ``(seq_id, tokens, context)`` (None for the prompts: nothing to draft)."""
    if not with_context:
        ops: list[tuple] = list(prompt_ops(workload))
        for step in steps:
            ops.extend(zip(step.seq_ids.tolist(), step.chunks, strict=True))
        return ops
    ops = [(i, prompt, None) for i, prompt in prompt_ops(workload)]
    for step in steps:
        ops.extend(zip(step.seq_ids.tolist(), step.chunks, step.contexts, strict=True))
    return ops


# ------------------------------------------------------------------------------------ oracle
class NgramOracle:
    """Brute-force counts over the stored sequences, to judge a draft independently of both trees.

    ``count(P)`` = number of (sequence, start) occurrences of P; the children of P are the tokens
    that follow its occurrences (only while ``len(P) < max_depth``).
    """

    def __init__(self, sequences: list[np.ndarray], max_depth: int) -> None:
        parts = []
        for sequence in sequences:
            parts += [sequence, np.full(1, -1, np.int32)]
        parts.append(np.full(max_depth + 1, -1, np.int32))
        self.tokens = np.concatenate(parts)
        self.max_depth = max_depth
        order = np.argsort(self.tokens, kind="stable")
        values, starts = np.unique(self.tokens[order], return_index=True)
        bounds = [*starts.tolist(), order.size]
        self._positions = {
            int(v): order[bounds[k] : bounds[k + 1]] for k, v in enumerate(values) if v >= 0
        }

    def occurrences(self, pattern: list[int]) -> np.ndarray:
        positions = self._positions.get(pattern[0], np.zeros(0, np.int64))
        for k in range(1, len(pattern)):
            positions = positions[self.tokens[positions + k] == pattern[k]]
        return positions

    def children(self, pattern: list[int]) -> tuple[int, dict[int, int]]:
        positions = self.occurrences(pattern)
        if len(pattern) >= self.max_depth:
            return positions.size, {}
        following = self.tokens[positions + len(pattern)]
        values, counts = np.unique(following[following >= 0], return_counts=True)
        return positions.size, dict(zip(values.tolist(), counts.tolist(), strict=True))

    def check_draft(
        self,
        context: np.ndarray,
        tokens: list[int],
        score: float,
        match_len: int,
        budget: int,
        min_token_prob: float,
    ) -> str | None:
        """None if ``tokens`` is a greedy walk (any most frequent child, so ties either way) from
        the last ``match_len`` context tokens, with the right score and stopping point; else why
        not."""  # fmt: skip
        if match_len == 0:
            return None if not tokens else "tokens without a match"
        path = context[-match_len:].tolist()
        if self.occurrences(path).size == 0:
            return f"match_len {match_len}: the context suffix does not occur"
        cumulative = 1.0
        total = 0.0
        for token in tokens:
            count, kids = self.children(path)
            if token not in kids:
                return f"token {token} does not follow {path[-3:]} (depth {len(path)})"
            if kids[token] != max(kids.values()):
                return f"token {token} (count {kids[token]}) is not a most frequent child"
            cumulative *= kids[token] / count
            if cumulative < min_token_prob * (1 - 1e-6):
                return f"cumulative probability {cumulative:.4f} below min_token_prob"
            total += cumulative
            path.append(token)
        if abs(total - score) > 1e-4 * max(1.0, total):
            return f"score {score:.5f} != {total:.5f}"
        if len(tokens) < budget:
            count, kids = self.children(path)
            if kids and cumulative * max(kids.values()) / count >= min_token_prob * (1 + 1e-6):
                return f"stopped after {len(tokens)} tokens though a child passes min_token_prob"
        return None


def compare_drafts(
    calls: list[tuple], drafts: dict[str, list], workload: Workload, ours_tree, args
):
    """Agreement of the two drafts per call, and whether each draft is right.

    ``aligned``: arctic only tries match lengths < len(context); for contexts no longer than
    max_depth ours is re-asked (untimed) with the first token dropped, so both try the same match
    lengths. Every aligned mismatch, and a sample of the rest, is checked against a brute-force
    oracle: a mismatch where both drafts are valid greedy walks comes from tie-breaking between
    equally frequent children (ours: smaller token; arctic: hash-map order), which can also move
    the best match length.
    """
    oracle = NgramOracle(workload.sequences, args.max_depth)
    rng = np.random.default_rng(args.seed + 2)
    num = len(calls)
    equal = aligned_equal = 0
    score_diffs = np.zeros(num)
    kinds = {"ties": 0, "ours_invalid": 0, "arctic_invalid": 0}
    invalid = {"ours": 0, "arctic": 0}
    num_checked = 0
    examples = []
    for i, (source, length, budget, context) in enumerate(calls):
        ours, arctic = drafts["ours"][i], drafts["arctic"][i]
        arctic_tokens = list(arctic.token_ids)
        score_diffs[i] = abs(ours.score - arctic.score)
        equal += ours.tokens.tolist() == arctic_tokens
        if length <= args.max_depth:
            ours = ours_tree.speculate(context[1:], budget, args.min_token_prob, None)
        ours_tokens = ours.tokens.tolist()
        mismatch = ours_tokens != arctic_tokens
        aligned_equal += not mismatch
        if not mismatch and rng.random() >= args.oracle_sample:
            continue
        num_checked += 1
        problems = {
            "ours": oracle.check_draft(
                context, ours_tokens, ours.score, ours.match_len, budget, args.min_token_prob
            ),
            "arctic": oracle.check_draft(
                context, arctic_tokens, arctic.score, arctic.match_len, budget, args.min_token_prob
            ),
        }
        for name, problem in problems.items():
            invalid[name] += problem is not None
        if mismatch:
            if problems["ours"]:
                kinds["ours_invalid"] += 1
            elif problems["arctic"]:
                kinds["arctic_invalid"] += 1
            else:
                kinds["ties"] += 1
        if (problems["ours"] or problems["arctic"]) and len(examples) < 5:
            examples.append(
                {
                    "source": source,
                    "context": context.tolist(),
                    "budget": budget,
                    "ours": [ours_tokens, ours.score, ours.match_len, problems["ours"]],
                    "arctic": [arctic_tokens, arctic.score, arctic.match_len, problems["arctic"]],
                }
            )
    return {
        "num_calls": num,
        "equal_fraction": equal / num,
        "aligned_equal_fraction": aligned_equal / num,
        "mean_abs_score_diff": float(score_diffs.mean()),
        "max_abs_score_diff": float(score_diffs.max()),
        "aligned_mismatch_kinds": kinds,
        "oracle_checked": num_checked,
        "oracle_invalid": invalid,
        "invalid_examples": examples,
    }
