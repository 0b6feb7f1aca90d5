"""Training and validation data: conversations -> one example per assistant turn -> batches.

Sources (``cfg.train_filepaths`` / ``cfg.valid_filepaths``, read as ``cfg.data_source`` says;
``"auto"`` decides per entry from its form):

- ``hf``: ``"hub_id,subset,split"`` or ``"hub_id,split"`` (the original's strings, e.g.
  ``"HuggingFaceTB/smoltalk,self-oss-instruct,train"``), read with
  ``datasets.load_dataset(hub_id, subset, split=split)`` (hub cache; ``HF_TOKEN`` for gated sets).
- ``local``: a ``.jsonl``, ``.json`` (a list, or an object holding one under ``data``) or
  ``.parquet`` file of rows ``{"messages": [{"role", "content"}, ...], "category": str?}``.
- ``tfds``: ``"tfds:name[/config][:version]:split"``, read lazily with ``tfds.load`` (built or
  downloaded beforehand into the TFDS data dir); a ``messages`` feature as a sequence of
  ``{role, content}`` (tfds's dict-of-arrays form is accepted).
- ``synthetic``: ``"synthetic:arithmetic:N"``, N short arithmetic conversations generated in
  code (tests, ``configs/tiny_test.py``).

Example construction (the original's SmolTalk processor):

- a row whose ``category`` is in ``exclude_train_data_category`` is skipped (the original does
  this for validation rows too; rows without a category are kept);
- every assistant message becomes one example: context = the conversation before it,
  rendered with ``add_generation_prompt=True`` (see ``l2d_jax.train.templates``), response =
  its content tokenised on its own without special tokens;
- the conversation is cut at its first assistant turn with ``len(context) + len(response) >
  max_seq_len``: that turn and all later ones are dropped (``truncate_or_drop="drop"``), or
  that one turn is kept cut to ``max_seq_len`` tokens when its context is shorter
  (``"truncate"``) and the later ones dropped; both are counted in ``stats``; ``"error"``
  stops with the offending conversation instead;
- ``input_ids = context + response``; ``labels`` SHIFTED: ``labels[i]`` is the token after
  position i, i.e. ``[-100] * (len(context) - 1) + response + [EOS]`` (a truncated example's
  last label is its first cut-off token); rows right-padded with EOS, labels -100 there.

Batches have static shapes: rows are padded to the smallest of a few lengths
(``seq_len_buckets``, default multiples of ``seq_len_bucket_size`` up to ``max_seq_len``), so a
step compiles at most once per bucket. With ``use_data_split_guidance`` each example has a
class label: the index in ``guidance_categories`` of its shared category (SmolTalk subset ->
math / coding / general_qa / other; smol-magpie-ultra rows by their ``category``), as the
original; otherwise ``Batch.class_labels`` is None.

Hosts: each host reads every ``process_count``-th row of every source, starting at its
``process_index`` (strided sharding of the conversation rows; all examples of a
conversation stay on one host), so the hosts together see every example exactly once per
epoch. Training order: a permutation of the host's examples per epoch from
``(seed, epoch)``; the stream runs on across epochs (a batch may span two), so every batch is
full. Its position (epoch, offset in examples) is ``Dataset.state()``; ``restore`` resumes at
the exact next batch, also with another batch size. With several processes, all hosts must
use one padded length per step: ``batches`` takes the maximum over hosts (a tiny
``process_allgather``) — the step is collective anyway.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from l2d_jax.errors import L2DError
from l2d_jax.train import templates

IGNORE_INDEX = -100
SMOLTALK = "HuggingFaceTB/smoltalk"
MAGPIE_ULTRA = "smol-magpie-ultra"
SHARED_TASKS = ("math", "coding", "general_qa", "other")
# The original's tasks/constants.py tables: SmolTalk subset -> shared guidance category,
# and smol-magpie-ultra row category -> shared category.
SMOLTALK_SUBSET_TO_SHARED = {
    "smol-constraints": "other", "smol-rewrite": "other", "smol-summarize": "other",
    "apigen-80k": "other", "everyday-conversations": "other", "explore-instruct-rewriting": "other",
    "longalign": "other", "systemchats-30k": "other",
    "metamathqa-50k": "math", "numina-cot-100k": "math",
    "openhermes-100k": "general_qa", "self-oss-instruct": "coding",
}
MAGPIE_CATEGORY_TO_SHARED = {
    "advice-seeking": "other", "brainstorming": "other", "coding": "coding",
    "creative-writing": "other", "data-analysis": "general_qa", "editing": "other",
    "information-seeking": "general_qa", "math": "math", "planning": "other",
    "reasoning": "general_qa", "role-playing": "other",
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLITS = ("train", "valid")


class DataError(L2DError, ValueError):
    """Data that cannot be read or leaves nothing to train on."""


class TooLongError(ValueError):
    """A turn longer than max_seq_len under ``truncate_or_drop="error"``."""


class Batch(NamedTuple):
    """One host's rows of a micro-step (numpy; the loop builds global arrays from them)."""

    input_ids: np.ndarray  # (B, T) int32, right-padded with EOS
    labels: np.ndarray  # (B, T) int32, shifted (labels[i] = token i+1), -100 = no loss
    class_labels: np.ndarray | None  # (B,) int32 guidance classes, None without guidance


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # hf | local | tfds | synthetic
    spec: str  # as written in the config
    name: str = ""  # hub id / file path / tfds name / synthetic generator
    subset: str | None = None
    split: str | None = None
    count: int = 0  # synthetic: number of conversations


def parse_source(spec: str, data_source: str = "auto") -> Source:
    """A ``train_filepaths`` entry as a ``Source`` (see the module docstring for the forms)."""
    kind = data_source
    if kind == "auto":
        low = spec.lower()
        if low.startswith("tfds:"):
            kind = "tfds"
        elif low.startswith("synthetic:"):
            kind = "synthetic"
        elif low.endswith(LOCAL_SUFFIXES) or Path(spec).exists():
            kind = "local"
        elif "," in spec:
            kind = "hf"
        else:
            raise DataError(f"data entry {spec!r}: cannot tell its kind; use 'hub_id,subset,split', a "
                            f"{'/'.join(LOCAL_SUFFIXES)} file, 'tfds:name:split' or 'synthetic:arithmetic:N'")
    if kind == "hf":
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) == 3:
            return Source("hf", spec, parts[0], parts[1] or None, parts[2])
        if len(parts) == 2:
            return Source("hf", spec, parts[0], None, parts[1])
        raise DataError(f"data entry {spec!r}: a hub dataset is 'hub_id,subset,split' or 'hub_id,split'")
    if kind == "local":
        return Source("local", spec, spec)
    if kind == "tfds":
        body = spec[5:] if spec.lower().startswith("tfds:") else spec
        bracket = body.find("[")  # a split slice such as train[:10%] may hold ':'
        head, tail = (body, "") if bracket < 0 else (body[:bracket], body[bracket:])
        name, sep, split = head.rpartition(":")
        split += tail
        if not sep or not name or not split:
            raise DataError(f"data entry {spec!r}: a tfds source is 'tfds:name[/config][:version]:split'")
        return Source("tfds", spec, name, None, split)
    if kind == "synthetic":
        body = spec[10:] if spec.lower().startswith("synthetic:") else spec
        name, _, count = body.partition(":")
        if name != "arithmetic" or not count.isdigit() or int(count) < 1:
            raise DataError(f"data entry {spec!r}: the synthetic source is 'synthetic:arithmetic:N' (N >= 1)")
        return Source("synthetic", spec, name, count=int(count))
    raise DataError(f"data_source={data_source!r}; use one of hf, local, tfds, synthetic, auto")


def _messages(raw: Any, where: str) -> list[dict]:
    """Plain ``[{"role", "content"}]`` from a row's messages (list of dicts or tfds dict of arrays)."""
    if isinstance(raw, dict) and "role" in raw and "content" in raw:
        raw = [{"role": r, "content": c} for r, c in zip(raw["role"], raw["content"])]
    if not isinstance(raw, (list, tuple)) and hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}}, got {type(raw).__name__}")
    out = []
    for m in raw:
        try:
            role, content = m["role"], m["content"]
        except (TypeError, KeyError):
            raise DataError(f"{where}: each message needs 'role' and 'content', got {m!r:.80}") from None
        out.append({"role": _text(role), "content": _text(content)})
    return out


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.shape == ():
        return _text(x.item())
    return str(x)


def _category(row: dict) -> str | None:
    cat = row.get("category") if isinstance(row, dict) else None
    return None if cat is None else _text(cat)


def read_local_rows(path: str | Path, key: str = "train_filepaths") -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"local data file not found: {p.resolve()} (listed in {key})")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{n}: invalid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("conversations"))
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows (or an object with a 'data' list)")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    raise DataError(f"{p}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def _hf_rows(src: Source, process_index: int, process_count: int) -> Iterable[dict]:
    import datasets

    args = (src.name, src.subset) if src.subset else (src.name,)
    try:
        ds = datasets.load_dataset(*args, split=src.split)
    except Exception as e:
        hint = ("; if the dataset is gated, `export HF_TOKEN=...` or `hf auth login`; offline, "
                "load it once with network access (it is cached) or convert it to a local .parquet")
        raise DataError(f"cannot load hub dataset {src.spec!r} (datasets.load_dataset{args!r}, "
                        f"split={src.split!r}): {type(e).__name__}: {str(e)[:300]}{hint}") from e
    if "messages" not in ds.column_names:
        raise DataError(f"hub dataset {src.spec!r} has no 'messages' column (columns: {ds.column_names})")
    ds = ds.select_columns([c for c in ("messages", "category") if c in ds.column_names])
    if process_count > 1:
        ds = ds.shard(num_shards=process_count, index=process_index, contiguous=False)
    return ds


def _tfds_rows(src: Source, process_index: int, process_count: int) -> Iterable[dict]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{src.spec!r}: tensorflow-datasets is not installed") from e
    try:
        ds = tfds.load(src.name, split=src.split)
    except Exception as e:
        raise DataError(f"cannot load tfds dataset {src.name!r} split {src.split!r} (from {src.spec!r}): "
                        f"{type(e).__name__}: {str(e)[:300]}; build or download it first "
                        "(`tfds build`, or set TFDS_DATA_DIR / --data_dir to where it is)") from e
    for i, row in enumerate(tfds.as_numpy(ds)):
        if i % process_count == process_index:
            yield row


def synthetic_conversations(count: int, split: str = "train") -> list[dict]:
    """``count`` arithmetic conversations (category "math"), half with a second turn;
    deterministic per (count, split), different between train and valid."""
    rng = np.random.default_rng([count, SPLITS.index(split) if split in SPLITS else 2, 20250115])
    rows = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        op = "+-*"[int(rng.integers(0, 3))]
        value = a + b if op == "+" else a - b if op == "-" else a * b
        messages = [{"role": "user", "content": f"What is {a}{op}{b}?"},
                    {"role": "assistant", "content": f"{a}{op}{b}={value}."}]
        if rng.random() < 0.5:
            c = int(rng.integers(1, 10))
            messages += [{"role": "user", "content": f"Add {c}."},
                         {"role": "assistant", "content": f"{value}+{c}={value + c}."}]
        rows.append({"messages": messages, "category": "math"})
    return rows


def source_rows(src: Source, split: str, process_index: int = 0, process_count: int = 1,
                key: str = "train_filepaths") -> Iterable[dict]:
    """This host's rows of ``src`` (every ``process_count``-th row from ``process_index``)."""
    if src.kind == "hf":
        return _hf_rows(src, process_index, process_count)
    if src.kind == "tfds":
        return _tfds_rows(src, process_index, process_count)
    if src.kind == "local":
        rows = read_local_rows(src.name, key)
    else:
        rows = synthetic_conversations(src.count, split)
    return rows[process_index::process_count]


# --------------------------------------------------------------------------- guidance classes


def class_labeler(src: Source, guidance_categories: Sequence[str],
                  exclude: Sequence[str] = ()) -> Callable[[str | None], int]:
    """category -> guidance class id for rows of ``src`` (the original's shared categories)."""
    cat2id = {c: i for i, c in enumerate(guidance_categories)}

    def shared_id(shared: str, why: str) -> int:
        if shared not in cat2id:
            raise DataError(f"{src.spec!r}: {why} maps to guidance category {shared!r}, which is not in "
                            f"guidance_categories={list(guidance_categories)}")
        return cat2id[shared]

    if src.kind == "hf" and src.name == SMOLTALK and src.subset != MAGPIE_ULTRA:
        if src.subset not in SMOLTALK_SUBSET_TO_SHARED:
            raise DataError(f"{src.spec!r}: no guidance category for SmolTalk subset {src.subset!r}")
        fixed = shared_id(SMOLTALK_SUBSET_TO_SHARED[src.subset], f"subset {src.subset!r}")
        return lambda category: fixed
    if src.kind == "hf" and src.name != SMOLTALK:
        raise DataError(f"{src.spec!r}: use_data_split_guidance knows SmolTalk subsets only (as the "
                        "original's training); use local files with categories instead")
    table = {k: v for k, v in MAGPIE_CATEGORY_TO_SHARED.items() if k not in exclude}
    ids = {k: shared_id(v, f"category {k!r}") for k, v in table.items() if v in cat2id}

    def label(category: str | None) -> int:
        if category in ids:
            return ids[category]
        if category in cat2id:
            return cat2id[category]
        raise DataError(f"{src.spec!r}: row category {category!r} has no guidance class (known: "
                        f"{sorted(ids)} and guidance_categories {list(guidance_categories)})")

    return label


# --------------------------------------------------------------------------- examples


def turn_examples(contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  max_seq_len: int, truncate_or_drop: str = "drop"):
    """The cut rule over one conversation's assistant turns (in order).

    Returns ``(kept, n_dropped)``, kept = list of ``(context, response, truncated)``: turns are
    kept while ``len(context) + len(response) <= max_seq_len``; at the first longer one the
    conversation ends (that turn and every later one dropped), except that with
    ``"truncate"`` that one turn is kept (marked truncated; cut to ``max_seq_len`` when
    stored) if its context is shorter than ``max_seq_len``; ``"error"`` raises
    ``TooLongError`` naming the turn and its length."""
    kept = []
    for i, (ctx, resp) in enumerate(zip(contexts, responses)):
        if len(ctx) + len(resp) <= max_seq_len:
            kept.append((ctx, resp, False))
            continue
        if truncate_or_drop == "error":
            raise TooLongError(f"assistant turn {i} has {len(ctx)} context + {len(resp)} response tokens, more "
                               f"than max_seq_len={max_seq_len}")
        dropped = len(contexts) - i
        if truncate_or_drop == "truncate" and len(ctx) < max_seq_len:
            kept.append((ctx, resp, True))
            dropped -= 1
        return kept, dropped
    return kept, 0


def example_arrays(context: Sequence[int], response: Sequence[int], eos_id: int,
                   max_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, shifted labels) of one example, cut to ``max_seq_len`` when given."""
    full = np.asarray(list(context) + list(response) + [eos_id], np.int32)
    n = len(full) - 1 if max_seq_len is None else min(len(full) - 1, max_seq_len)
    ids = full[:n].copy()
    labels = full[1:n + 1].copy()
    labels[:max(len(context) - 1, 0)] = IGNORE_INDEX
    return ids, labels


@dataclasses.dataclass
class _Store:
    """Examples as flat arrays: tokens[offsets[i]:offsets[i+1]] = input ids of example i."""

    tokens: list = dataclasses.field(default_factory=list)
    lengths: list = dataclasses.field(default_factory=list)
    n_context: list = dataclasses.field(default_factory=list)
    last_label: list = dataclasses.field(default_factory=list)
    class_id: list = dataclasses.field(default_factory=list)

    def add(self, ids: np.ndarray, n_context: int, last_label: int, class_id: int) -> None:
        self.tokens.append(ids)
        self.lengths.append(len(ids))
        self.n_context.append(n_context)
        self.last_label.append(last_label)
        self.class_id.append(class_id)

    def freeze(self) -> dict[str, np.ndarray]:
        lengths = np.asarray(self.lengths, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(self.tokens).astype(np.int32) if self.tokens else np.zeros(0, np.int32)
        return dict(tokens=tokens, offsets=offsets, lengths=lengths.astype(np.int32),
                    n_context=np.asarray(self.n_context, np.int32),
                    last_label=np.asarray(self.last_label, np.int32),
                    class_id=np.asarray(self.class_id, np.int32))


def _new_stats() -> dict[str, Any]:
    return dict(conversations=0, excluded_by_category=0, examples=0, dropped=0, truncated=0,
                cut_conversations=0, tokens=0, loss_tokens=0, max_length=0, per_source={})


def build_examples(rows: Iterable[dict], *, src: Source, tokenizer, chat_format: templates.ChatFormat,
                   max_seq_len: int, truncate_or_drop: str, exclude: Sequence[str],
                   labeler: Callable[[str | None], int] | None, store: _Store, stats: dict,
                   chunk: int = 256) -> None:
    """Appends the examples of ``rows`` to ``store`` (tokenising a chunk of conversations at a
    time: contexts rendered with the chat template, then encoded in one batched call)."""
    eos = tokenizer.eos_token_id
    excluded = set(exclude or ())
    before = stats["examples"]
    pending: list[tuple[list[str], list[str], int, int]] = []  # contexts, responses, class, row

    def flush():
        ctx_texts = [t for c, *_ in pending for t in c]
        resp_texts = [t for _, r, *_ in pending for t in r]
        if not ctx_texts:
            pending.clear()
            return
        ctx_ids = tokenizer(ctx_texts, add_special_tokens=False)["input_ids"]
        resp_ids = tokenizer(resp_texts, add_special_tokens=False)["input_ids"]
        k = 0
        for contexts, _, class_id, row_index in pending:
            n = len(contexts)
            try:
                kept, dropped = turn_examples(ctx_ids[k:k + n], resp_ids[k:k + n], max_seq_len, truncate_or_drop)
            except TooLongError as e:
                raise DataError(f"{src.spec!r}, conversation {row_index}: {e}. Raise max_seq_len or set "
                                "truncate_or_drop to 'drop' (the original) or 'truncate'") from None
            k += n
            stats["dropped"] += dropped
            stats["cut_conversations"] += bool(dropped) or any(t for _, _, t in kept)
            for ctx, resp, truncated in kept:
                if len(ctx) < 1:
                    raise DataError(f"{src.spec!r}: a context rendered to no tokens; the chat template "
                                    "must produce at least one token before the response")
                ids, labels = example_arrays(ctx, resp, eos, max_seq_len)
                store.add(ids, len(ctx), int(labels[-1]), class_id)
                stats["examples"] += 1
                stats["truncated"] += truncated
                stats["tokens"] += len(ids)
                stats["loss_tokens"] += int((labels != IGNORE_INDEX).sum())
                stats["max_length"] = max(stats["max_length"], len(ids))
        pending.clear()

    for n, row in enumerate(rows):
        where = f"{src.spec!r} row {n}"
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where}: expected an object with 'messages', got {str(row)[:80]!r}")
        stats["conversations"] += 1
        category = _category(row)
        if category is not None and category in excluded:
            stats["excluded_by_category"] += 1
            continue
        messages = _messages(row["messages"], where)
        contexts, responses = [], []
        for i in range(1, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            contexts.append(chat_format.render(tokenizer, messages[:i], add_generation_prompt=True))
            responses.append(messages[i]["content"])
        class_id = -1 if labeler is None else labeler(category)
        pending.append((contexts, responses, class_id, n))
        if len(pending) >= chunk:
            flush()
    flush()
    stats["per_source"][src.spec] = stats["per_source"].get(src.spec, 0) + stats["examples"] - before


# --------------------------------------------------------------------------- hosts


class HostComm:
    """Integer max / sum over the processes (identity with one process)."""

    def __init__(self, max_fn: Callable[[int], int] | None = None,
                 sum_fn: Callable[[int], int] | None = None):
        self.max = max_fn or (lambda x: int(x))
        self.sum = sum_fn or (lambda x: int(x))

    @classmethod
    def jax_processes(cls) -> "HostComm":
        import jax

        if jax.process_count() == 1:
            return cls()
        from jax.experimental import multihost_utils

        def gather(x: int) -> np.ndarray:
            return np.asarray(multihost_utils.process_allgather(np.asarray(x, np.int64)))

        return cls(lambda x: int(gather(x).max()), lambda x: int(gather(x).sum()))


def default_buckets(max_seq_len: int, bucket_size: int) -> tuple[int, ...]:
    """Multiples of ``bucket_size`` below ``max_seq_len``, then ``max_seq_len``."""
    return tuple(sorted({min(k * bucket_size, max_seq_len)
                         for k in range(1, math.ceil(max_seq_len / bucket_size) + 1)}))


# --------------------------------------------------------------------------- dataset


class Dataset:
    """This host's examples of one split, batched with static shapes (see the module docstring).

    ``len(ds)``: examples on this host; ``ds.stats``: counts (examples, dropped, truncated,
    excluded_by_category, tokens, loss_tokens, ...); ``ds.state()`` / ``ds.restore(state)``:
    the stream position (a small dict for the checkpoint)."""

    def __init__(self, arrays: dict[str, np.ndarray], *, split: str, eos_id: int, buckets: Sequence[int],
                 seed: int, use_classes: bool, stats: dict, process_index: int = 0, process_count: int = 1,
                 comm: HostComm | None = None):
        self.split = split
        self.eos_id = int(eos_id)
        self.buckets = tuple(int(b) for b in buckets)
        self.seed = int(seed)
        self.use_classes = use_classes
        self.stats = stats
        self.process_index, self.process_count = process_index, process_count
        self.comm = comm or HostComm()
        self._a = arrays
        self._epoch = 0
        self._offset = 0

    def __len__(self) -> int:
        return len(self._a["lengths"])

    def global_size(self) -> int:
        """Examples over all hosts."""
        return self.comm.sum(len(self))

    # ---- one example
    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """(input_ids, labels, class id or None) of example i, unpadded."""
        a = self._a
        ids = a["tokens"][a["offsets"][i]:a["offsets"][i + 1]]
        labels = np.empty_like(ids)
        labels[:-1] = ids[1:]
        labels[-1] = a["last_label"][i]
        labels[:max(int(a["n_context"][i]) - 1, 0)] = IGNORE_INDEX
        return ids, labels, (int(a["class_id"][i]) if self.use_classes else None)

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise DataError(f"an example of {length} tokens exceeds the largest bucket {self.buckets[-1]}")

    def collate(self, indices: Sequence[int], batch_size: int) -> Batch:
        """Rows ``indices`` padded to ``batch_size`` rows (extra rows: EOS, no loss) and to a bucket."""
        longest = int(self._a["lengths"][list(indices)].max()) if len(indices) else 1
        length = self.bucket(self.comm.max(self.bucket(longest)))
        input_ids = np.full((batch_size, length), self.eos_id, np.int32)
        labels = np.full((batch_size, length), IGNORE_INDEX, np.int32)
        classes = np.zeros((batch_size,), np.int32)
        for r, i in enumerate(indices):
            ids, lab, cls = self.example(int(i))
            input_ids[r, :len(ids)] = ids
            labels[r, :len(ids)] = lab
            classes[r] = cls if cls is not None else 0
        return Batch(input_ids, labels, classes if self.use_classes else None)

    # ---- order and position
    def order(self, epoch: int) -> np.ndarray:
        """The training permutation of this host's examples for ``epoch`` (from seed and epoch)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(len(self))

    def state(self) -> dict:
        """Position after the last batch handed out (epoch, offset in examples of that epoch;
        ``consumed`` = examples handed out so far = epoch x len + offset)."""
        return dict(epoch=int(self._epoch), offset=int(self._offset),
                    consumed=int(self._epoch) * len(self) + int(self._offset), seed=self.seed,
                    num_examples=len(self), process_index=self.process_index,
                    process_count=self.process_count)

    def restore(self, state: dict) -> None:
        """Continue from ``state()``; the data must be the same as when it was taken."""
        for key, mine in (("process_count", self.process_count), ("process_index", self.process_index),
                          ("num_examples", len(self))):
            if key in state and int(state[key]) != mine:
                raise DataError(f"cannot resume the {self.split} data: the saved position is for "
                                f"{key}={state[key]}, this run has {mine} (changed data or host count)")
        if int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"cannot resume the {self.split} data: saved with seed {state['seed']}, "
                            f"this run uses seed {self.seed}")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= len(self):
            raise DataError(f"invalid data state {state!r}")
        self._epoch, self._offset = epoch, offset

    def seek(self, consumed: int) -> None:
        """Position after ``consumed`` training examples of this host (e.g. steps x accumulation
        steps x batch_size_per_host), as ``restore`` of the state saved then."""
        if len(self) == 0 or consumed < 0:
            raise DataError(f"cannot seek to example {consumed} of {len(self)}")
        self._epoch, self._offset = divmod(int(consumed), len(self))

    # ---- batches
    def batches(self, batch_size_per_host: int) -> Iterator[Batch]:
        """Training: an endless stream from the current position (state() follows it).
        Validation: one pass in file order; the last batch padded with no-loss rows; every
        host yields the same number of batches."""
        if batch_size_per_host < 1:
            raise ValueError(f"batch_size_per_host={batch_size_per_host} must be >= 1")
        if self.split == "train":
            return self._train_batches(batch_size_per_host)
        return self._valid_batches(batch_size_per_host)

    def _train_batches(self, b: int) -> Iterator[Batch]:
        if len(self) == 0:
            raise DataError("no training examples on this host")
        perm = self.order(self._epoch)
        while True:
            picked: list[int] = []
            while len(picked) < b:
                if self._offset >= len(self):
                    self._epoch += 1
                    self._offset = 0
                    perm = self.order(self._epoch)
                take = min(b - len(picked), len(self) - self._offset)
                picked.extend(perm[self._offset:self._offset + take].tolist())
                self._offset += take
            yield self.collate(picked, b)

    def _valid_batches(self, b: int) -> Iterator[Batch]:
        n_batches = self.comm.max(math.ceil(len(self) / b))
        for k in range(n_batches):
            yield self.collate(list(range(k * b, min((k + 1) * b, len(self)))), b)

    def num_batches(self, batch_size_per_host: int) -> int:
        """Validation batches per pass (equal on every host)."""
        return self.comm.max(math.ceil(len(self) / batch_size_per_host))


def make_dataset(cfg, tokenizer, split: str = "train", *, process_index: int | None = None,
                 process_count: int | None = None, comm: HostComm | None = None) -> Dataset:
    """The ``split`` ("train" | "valid") examples of this host. ``process_index`` /
    ``process_count`` default to JAX's (pass them to simulate hosts; then no cross-host
    communication happens unless ``comm`` is given)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
        comm = comm or HostComm.jax_processes()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    key = "train_filepaths" if split == "train" else "valid_filepaths"
    specs = list(cfg[key] or ())
    if not specs:
        raise DataError(f"{key} is empty")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token (needed for labels and padding)")
    chat_format = templates.training_chat_format(
        cfg.get("specified_template_type"), cfg.get("train_data_template", "original"),
        cfg.get("tokenizer_dir") or cfg.get("pretrained_model_dir"), tokenizer)
    exclude = tuple(cfg.get("exclude_train_data_category") or ())
    use_classes = bool(cfg.get("use_data_split_guidance"))
    store, stats = _Store(), _new_stats()
    sources = [parse_source(s, cfg.get("data_source", "auto")) for s in specs]
    for src in sources:
        labeler = class_labeler(src, cfg.guidance_categories, exclude) if use_classes else None
        build_examples(source_rows(src, split, process_index, process_count, key), src=src,
                       tokenizer=tokenizer, chat_format=chat_format, max_seq_len=int(cfg.max_seq_len),
                       truncate_or_drop=cfg.get("truncate_or_drop", "drop"), exclude=exclude,
                       labeler=labeler, store=store, stats=stats)
    stats.update(split=split, sources=specs, chat_format=chat_format.name,
                 process_index=process_index, process_count=process_count)
    if stats["examples"] == 0:
        where = "" if process_count == 1 else f" on host {process_index} of {process_count}"
        raise DataError(
            f"no {split} examples{where} from {specs} after the filters: exclude_train_data_category="
            f"{list(exclude)}, max_seq_len={cfg.max_seq_len} ({cfg.get('truncate_or_drop', 'drop')}); "
            f"read {stats['conversations']} conversations, {stats['excluded_by_category']} excluded by "
            f"category, {stats['dropped']} assistant turns dropped as too long")
    buckets = tuple(cfg.get("seq_len_buckets") or ()) or default_buckets(
        int(cfg.max_seq_len), int(cfg.get("seq_len_bucket_size", 256)))
    return Dataset(store.freeze(), split=split, eos_id=tokenizer.eos_token_id, buckets=buckets,
                   seed=int(cfg.seed), use_classes=use_classes, stats=stats,
                   process_index=process_index, process_count=process_count, comm=comm)
