"""Training data: the original's example construction (checked by decoding against strings
written by hand), cut / truncate / drop, category exclusion, sources, order, resume, hosts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from l2d_jax import config as C
from l2d_jax.train import data as D
from l2d_jax.train import templates as T

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_test.py"
GUIDANCE = ("math", "coding", "general_qa", "other")

# A hand-written conversation with two assistant turns (and a system turn).
CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
], "category": "math"}
# The tiny tokenizer's template: <s>, then per message <|role|> content </s>; prompt <|assistant|>.
CTX1 = "<s><|system|>Be brief.</s><|user|>Hi</s><|assistant|>"
CTX2 = CTX1 + "Yo.</s><|user|>2+2?</s><|assistant|>"


@pytest.fixture(scope="module")
def tok():
    return C.tiny_tokenizer()


def cfg_with(**values):
    cfg = C.load_config(TINY, validate=False)
    for k, v in values.items():
        setattr(cfg, k, v)
    return C.validate_config(cfg, num_devices=1, process_count=1)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def local_dataset(tmp_path, tok, rows, split="train", name="d.jsonl", **cfg):
    path = write_jsonl(tmp_path / name, rows)
    key = "train_filepaths" if split == "train" else "valid_filepaths"
    c = cfg_with(data_source="local", **{key: (path,)}, **cfg)
    return D.make_dataset(c, tok, split, process_index=0, process_count=1)


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def real_row(batch, r):
    """(input_ids, labels) of row r without its padding (the last real position has a label)."""
    keep = np.nonzero(batch.labels[r] != D.IGNORE_INDEX)[0]
    end = int(keep[-1]) + 1 if len(keep) else 0
    return tuple(batch.input_ids[r, :end].tolist()), tuple(batch.labels[r, :end].tolist())


def rows_of(batches):
    return [real_row(b, r) for b in batches for r in range(b.input_ids.shape[0])]


# --------------------------------------------------------------------------- examples


def test_two_assistant_turns_make_two_examples(tmp_path, tok):
    ds = local_dataset(tmp_path, tok, [CONV])
    assert len(ds) == 2 and ds.stats["examples"] == 2 and ds.stats["conversations"] == 1
    eos = tok.eos_token_id
    for i, (ctx, resp) in enumerate([(CTX1, "Yo."), (CTX2, "4.")]):
        ids, labels, cls = ds.example(i)
        assert cls is None
        assert decode(tok, ids) == ctx + resp  # input = context + response (no EOS in the input)
        n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
        assert n_ctx == {0: 17, 1: 28}[i]  # counted by hand: one id per special token / character
        # labels shifted: -100 on the first len(context) - 1 positions, then the response, then EOS
        assert (labels[:n_ctx - 1] == D.IGNORE_INDEX).all()
        assert decode(tok, labels[n_ctx - 1:]) == resp + "</s>"
        assert labels[-1] == eos
        np.testing.assert_array_equal(labels[n_ctx - 1:-1], ids[n_ctx:])


def test_padding_is_eos_with_ignored_labels(tmp_path, tok):
    ds = local_dataset(tmp_path, tok, [CONV], split="valid")
    (batch,) = list(ds.batches(3))  # 2 examples + 1 empty row
    assert batch.input_ids.dtype == np.int32 and batch.labels.dtype == np.int32
    assert batch.input_ids.shape == (3, 32)
    n0 = len(ds.example(0)[0])
    assert (batch.input_ids[0, n0:] == tok.eos_token_id).all()
    assert (batch.labels[0, n0:] == D.IGNORE_INDEX).all()
    assert (batch.input_ids[2] == tok.eos_token_id).all() and (batch.labels[2] == D.IGNORE_INDEX).all()
    assert real_row(batch, 1) == tuple(tuple(x.tolist()) for x in ds.example(1)[:2])


def test_category_exclusion(tmp_path, tok):
    rows = [dict(CONV, category="editing"), dict(CONV, category="math"),
            {"messages": CONV["messages"]}, dict(CONV, category="role-playing")]
    ds = local_dataset(tmp_path, tok, rows)
    assert ds.stats["excluded_by_category"] == 2 and ds.stats["conversations"] == 4
    assert len(ds) == 4  # two kept conversations x two turns
    valid = local_dataset(tmp_path, tok, rows, split="valid")  # the original filters validation too
    assert len(valid) == 4


LONG = {"messages": [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo."},
    {"role": "user", "content": "Tell"},
    {"role": "assistant", "content": "x" * 40},  # context 17 + 40 > 40
    {"role": "user", "content": "ok"},
    {"role": "assistant", "content": "k."},  # short, but after the cut
]}


def test_conversation_is_cut_at_the_first_too_long_turn(tmp_path, tok):
    ds = local_dataset(tmp_path, tok, [LONG], max_seq_len=40)
    assert len(ds) == 1 and decode(tok, ds.example(0)[0]) == "<s><|user|>Hi</s><|assistant|>Yo."
    assert ds.stats["dropped"] == 2 and ds.stats["truncated"] == 0 and ds.stats["cut_conversations"] == 1


def test_truncate_keeps_the_first_too_long_turn_cut(tmp_path, tok):
    ds = local_dataset(tmp_path, tok, [LONG], max_seq_len=40, truncate_or_drop="truncate")
    assert len(ds) == 2 and ds.stats["dropped"] == 1 and ds.stats["truncated"] == 1
    ids, labels, _ = ds.example(1)
    ctx = "<s><|user|>Hi</s><|assistant|>Yo.</s><|user|>Tell</s><|assistant|>"
    assert len(ids) == 40 and decode(tok, ids) == ctx + "x" * 23
    assert decode(tok, labels[16:]) == "x" * 24  # the last label is the first cut-off token
    assert ds.buckets == (32, 40)


def test_error_mode_names_the_conversation_and_the_fix(tmp_path, tok):
    with pytest.raises(D.DataError, match=r"conversation 1: assistant turn 1 has 17 context \+ 40 response "
                                          r"tokens, more than max_seq_len=40.*truncate_or_drop"):
        local_dataset(tmp_path, tok, [CONV, LONG], max_seq_len=40, truncate_or_drop="error")
    assert len(local_dataset(tmp_path, tok, [CONV], max_seq_len=40, truncate_or_drop="error")) == 2


def test_turn_examples_rule():
    ctxs, resps = [[1] * 3, [1] * 8, [1] * 12], [[2] * 2, [2] * 5, [2] * 1]
    kept, dropped = D.turn_examples(ctxs, resps, 10, "drop")
    assert [len(c) + len(r) for c, r, _ in kept] == [5] and dropped == 2
    kept, dropped = D.turn_examples(ctxs, resps, 10, "truncate")
    assert [t for *_, t in kept] == [False, True] and dropped == 1
    kept, dropped = D.turn_examples([[1] * 10], [[2]], 10, "truncate")  # no room for a response
    assert kept == [] and dropped == 1
    ids, labels = D.example_arrays([5, 6, 7], [8, 9], eos_id=2)
    assert ids.tolist() == [5, 6, 7, 8, 9] and labels.tolist() == [-100, -100, 8, 9, 2]


def test_empty_after_filtering_names_sources_and_filter(tmp_path, tok):
    with pytest.raises(D.DataError) as e:
        local_dataset(tmp_path, tok, [dict(CONV, category="editing")])
    msg = str(e.value)
    assert "d.jsonl" in msg and "exclude_train_data_category" in msg and "editing" in msg
    assert "1 excluded by category" in msg


def test_missing_local_file_names_the_path(tmp_path, tok):
    missing = tmp_path / "nope" / "missing.jsonl"
    c = cfg_with(data_source="local", train_filepaths=(str(missing),))
    with pytest.raises(D.DataError, match=f"local data file not found: {missing}"):
        D.make_dataset(c, tok, "train", process_index=0, process_count=1)


# --------------------------------------------------------------------------- sources


def test_local_jsonl_json_and_parquet_agree(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [CONV, LONG, {"messages": CONV["messages"][1:3]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "d.jsonl", rows)
    got = []
    for name in ("d.jsonl", "d.json", "d.parquet"):
        c = cfg_with(data_source="auto", train_filepaths=(str(tmp_path / name),))
        ds = D.make_dataset(c, tok, "train", process_index=0, process_count=1)
        got.append([tuple(ds.example(i)[0].tolist()) for i in range(len(ds))])
    assert got[0] == got[1] == got[2] and len(got[0]) == 2 + 2 + 1  # LONG: cut at its 3rd turn (65 > 64)


def test_parse_source_forms():
    s = D.parse_source("HuggingFaceTB/smoltalk,self-oss-instruct,train", "hf")
    assert (s.kind, s.name, s.subset, s.split) == ("hf", D.SMOLTALK, "self-oss-instruct", "train")
    s = D.parse_source("org/ds,test", "auto")
    assert (s.kind, s.subset, s.split) == ("hf", None, "test")
    s = D.parse_source("tfds:my_chats/en:1.0.0:train[:50%]", "auto")
    assert (s.kind, s.name, s.split) == ("tfds", "my_chats/en:1.0.0", "train[:50%]")
    assert D.parse_source("x/y.parquet", "auto").kind == "local"
    assert D.parse_source("synthetic:arithmetic:5", "auto").count == 5
    with pytest.raises(D.DataError, match="tfds:name"):
        D.parse_source("tfds:noslit", "tfds")
    with pytest.raises(D.DataError, match="hub_id,subset,split"):
        D.parse_source("a,b,c,d", "hf")
    with pytest.raises(D.DataError, match="synthetic:arithmetic:N"):
        D.parse_source("synthetic:poems:3", "auto")


def _smoltalk_rows(with_category: bool):
    cats = ["math", "editing", "coding", "information-seeking"]
    rows = []
    for i, cat in enumerate(cats):
        row = {"messages": [{"content": f"Q{i}", "role": "user"}, {"content": f"A{i}.", "role": "assistant"}]}
        if with_category:
            row["category"] = cat
        rows.append(row)
    return rows


def test_hf_source_calls_load_dataset_with_id_subset_split(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load(*args, split=None, **kw):
        calls.append((args, split))
        magpie = args[1:] == ("smol-magpie-ultra",)
        return datasets.Dataset.from_list(_smoltalk_rows(with_category=magpie))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    c = cfg_with(data_source="hf", valid_filepaths=("HuggingFaceTB/smoltalk,smol-magpie-ultra,test",
                                                     "HuggingFaceTB/smoltalk,self-oss-instruct,test",
                                                     "someone/chats,validation"))
    ds = D.make_dataset(c, tok, "valid", process_index=0, process_count=1)
    assert calls == [(("HuggingFaceTB/smoltalk", "smol-magpie-ultra"), "test"),
                     (("HuggingFaceTB/smoltalk", "self-oss-instruct"), "test"),
                     (("someone/chats",), "validation")]
    assert ds.stats["excluded_by_category"] == 1  # the magpie "editing" row
    assert ds.stats["per_source"]["HuggingFaceTB/smoltalk,smol-magpie-ultra,test"] == 3
    assert len(ds) == 3 + 4 + 4
    assert decode(tok, ds.example(0)[0]) == "<s><|user|>Q0</s><|assistant|>A0."
    # hosts read strided shards of the hub rows
    calls.clear()
    parts = [D.make_dataset(c, tok, "valid", process_index=p, process_count=2) for p in range(2)]
    assert sorted(len(p) for p in parts) == [5, 6]


def test_hf_load_failure_has_a_hint(monkeypatch, tok):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    c = cfg_with(data_source="hf", train_filepaths=("HuggingFaceTB/smoltalk,self-oss-instruct,train",))
    with pytest.raises(D.DataError, match=r"self-oss-instruct.*HF_TOKEN"):
        D.make_dataset(c, tok, "train", process_index=0, process_count=1)


def test_tfds_source_dispatch_and_error(monkeypatch, tok):
    import tensorflow_datasets as tfds

    loaded = []
    rows = [{"messages": {"role": np.array([b"user", b"assistant"]), "content": np.array([b"Hi", b"Yo."])},
             "category": b"math"}] * 3
    monkeypatch.setattr(tfds, "load", lambda name, split: loaded.append((name, split)) or rows)
    monkeypatch.setattr(tfds, "as_numpy", lambda ds: ds)
    c = cfg_with(data_source="tfds", train_filepaths=("tfds:my_chats/en:train",))
    ds = D.make_dataset(c, tok, "train", process_index=0, process_count=1)
    assert loaded == [("my_chats/en", "train")] and len(ds) == 3
    assert decode(tok, ds.example(0)[0]) == "<s><|user|>Hi</s><|assistant|>Yo."
    assert len(D.make_dataset(c, tok, "train", process_index=1, process_count=2)) == 1

    def missing(name, split):
        raise RuntimeError(f"Dataset {name} not found")

    monkeypatch.setattr(tfds, "load", missing)
    with pytest.raises(D.DataError, match=r"tfds dataset 'my_chats/en' split 'train'.*tfds build"):
        D.make_dataset(c, tok, "train", process_index=0, process_count=1)


# --------------------------------------------------------------------------- guidance classes


def test_guidance_classes_follow_the_original(monkeypatch, tmp_path, tok):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None: datasets.Dataset.from_list(
        _smoltalk_rows(with_category=a[1:] == ("smol-magpie-ultra",))))
    c = cfg_with(data_source="hf", use_data_split_guidance=True, guidance_categories=GUIDANCE,
                 valid_filepaths=("HuggingFaceTB/smoltalk,smol-magpie-ultra,test",
                                  "HuggingFaceTB/smoltalk,metamathqa-50k,test",
                                  "HuggingFaceTB/smoltalk,self-oss-instruct,test"))
    ds = D.make_dataset(c, tok, "valid", process_index=0, process_count=1)
    # magpie rows math, coding, information-seeking ("editing" excluded); then 4 math, 4 coding
    assert [ds.example(i)[2] for i in range(len(ds))] == [0, 1, 2] + [0] * 4 + [1] * 4
    batch = next(ds.batches(4))
    assert batch.class_labels.tolist() == [0, 1, 2, 0] and batch.class_labels.dtype == np.int32
    # local rows: by their category; unknown categories are an error naming it
    ds = local_dataset(tmp_path, tok, [CONV], use_data_split_guidance=True, guidance_categories=GUIDANCE)
    assert ds.example(0)[2] == 0
    with pytest.raises(D.DataError, match="'poetry'"):
        local_dataset(tmp_path, tok, [dict(CONV, category="poetry")], use_data_split_guidance=True,
                      guidance_categories=GUIDANCE)


# --------------------------------------------------------------------------- templates


def test_named_templates_render_as_the_original(tok):
    msgs = CONV["messages"][:2]
    text = tok.apply_chat_template(msgs, chat_template=T.FIXED_DATE_LLAMA3, tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                    "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
                    "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    text = tok.apply_chat_template(CONV["messages"][:4], chat_template=T.BASE_LLAMA, tokenize=False,
                                   add_generation_prompt=True)
    assert text == "### Question ###\nHi\n### Answer ###\nYo.\n### Question ###\n2+2?\n### Answer ###\n"


def test_training_template_original_vs_specified(tmp_path, tok):
    f = T.training_chat_format("base_llama", "original", "meta-llama/Llama-3.1-8B-Instruct")
    assert f.chat_template is None and f.template_kwargs == {"date_string": "26 Jul 2024"}
    assert T.training_chat_format(None, "original", "Qwen/Qwen2.5-7B-Instruct").template_kwargs == {}
    dated = C.tiny_tokenizer()
    dated.chat_template = "{{ date_string }}|" + C.TINY_CHAT_TEMPLATE
    assert f.render(dated, CONV["messages"][1:2]).startswith("26 Jul 2024|<s><|user|>Hi")
    ds = local_dataset(tmp_path, tok, [CONV], specified_template_type="base_llama",
                       train_data_template="specified")
    assert decode(tok, ds.example(0)[0]) == "### Question ###\nHi\n### Answer ###\nYo."
    ds = local_dataset(tmp_path, tok, [CONV], specified_template_type="base_llama")  # original: ignored
    assert decode(tok, ds.example(0)[0]) == CTX1 + "Yo."


# --------------------------------------------------------------------------- order, resume, hosts


@pytest.fixture(scope="module")
def synth_cfg():
    return cfg_with()  # tiny_test: synthetic:arithmetic:64 -> 95 examples


def train_ds(cfg, tok, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return D.make_dataset(cfg, tok, "train", **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_order_is_deterministic_per_seed(synth_cfg, tok):
    a = rows_of(take(train_ds(synth_cfg, tok).batches(8), 3))
    b = rows_of(take(train_ds(synth_cfg, tok).batches(8), 3))
    other = synth_cfg.copy_and_resolve_references()
    other.seed = synth_cfg.seed + 1
    c = rows_of(take(train_ds(other, tok).batches(8), 3))
    assert a == b and a != c
    ds = train_ds(synth_cfg, tok)
    assert not np.array_equal(ds.order(0), ds.order(1))  # reshuffled per epoch


def test_resume_continues_with_the_exact_next_batch(synth_cfg, tok):
    ds = train_ds(synth_cfg, tok)
    assert len(ds) == 95
    it = ds.batches(8)
    take(it, 11)
    state = ds.state()
    assert state["epoch"] == 0 and state["offset"] == 88
    expected = take(it, 2)  # crosses into epoch 1
    assert ds.state()["epoch"] == 1 and ds.state()["offset"] == 9
    again = train_ds(synth_cfg, tok)
    again.restore(json.loads(json.dumps(state)))  # the state is plain JSON
    got = take(again.batches(8), 2)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e.input_ids, g.input_ids)
        np.testing.assert_array_equal(e.labels, g.labels)
    # another batch size continues at the same example
    third = train_ds(synth_cfg, tok)
    third.restore(state)
    assert rows_of(take(third.batches(4), 2)) == rows_of(expected[:1])
    with pytest.raises(D.DataError, match="num_examples"):
        third.restore(dict(state, num_examples=94))
    # or from the step count alone: 11 batches of 8 examples
    fourth = train_ds(synth_cfg, tok)
    fourth.seek(11 * 8)
    assert fourth.state() == state and rows_of(take(fourth.batches(8), 2)) == rows_of(expected)


def test_epoch_covers_every_example_once(synth_cfg, tok):
    ds = train_ds(synth_cfg, tok)
    first = rows_of(take(ds.batches(5), 19))  # 95 = 19 x 5
    assert sorted(first) == sorted(ds_rows(ds))
    assert (ds.state()["epoch"], ds.state()["offset"]) == (0, 95)


def ds_rows(ds):
    return [(tuple(ds.example(i)[0].tolist()), tuple(ds.example(i)[1].tolist())) for i in range(len(ds))]


def test_hosts_cover_every_example_exactly_once(synth_cfg, tok):
    whole = sorted(ds_rows(train_ds(synth_cfg, tok)))
    parts = [train_ds(synth_cfg, tok, process_index=p, process_count=3) for p in range(3)]
    union = []
    for ds in parts:
        union += rows_of(take(ds.batches(1), len(ds)))  # one epoch of this host
        assert ds.stats["process_count"] == 3
    assert sorted(union) == whole
    with pytest.raises(D.DataError, match="process_count"):
        parts[0].restore(train_ds(synth_cfg, tok).state())


def test_buckets_bound_the_shapes(synth_cfg, tok):
    shapes = {b.input_ids.shape for b in take(train_ds(synth_cfg, tok).batches(4), 60)}
    assert shapes <= {(4, 32), (4, 64)} and len(shapes) == 2
    c = synth_cfg.copy_and_resolve_references()
    c.seq_len_buckets = (64,)
    assert {b.labels.shape for b in take(train_ds(c, tok).batches(4), 10)} == {(4, 64)}
    assert D.default_buckets(2048, 256) == (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    assert D.default_buckets(100, 32) == (32, 64, 96, 100)


def test_hosts_agree_on_the_padded_length(synth_cfg, tok):
    """With several hosts every batch takes the largest bucket any host needs (comm.max)."""
    ds = train_ds(synth_cfg, tok, process_index=0, process_count=2, comm=D.HostComm(max_fn=lambda x: 64))
    assert {b.input_ids.shape[1] for b in take(ds.batches(2), 10)} == {64}


def test_validation_is_finite_and_equal_across_hosts(synth_cfg, tok):
    valid = D.make_dataset(synth_cfg, tok, "valid", process_index=0, process_count=1)
    batches = list(valid.batches(4))
    assert len(batches) == valid.num_batches(4) == -(-len(valid) // 4)
    assert rows_of(batches)[:len(valid)] == ds_rows(valid)
    lagging = D.make_dataset(synth_cfg, tok, "valid", process_index=0, process_count=1,
                             comm=D.HostComm(max_fn=lambda x: max(x, 9)))
    assert len(list(lagging.batches(4))) == 9  # padded with no-loss batches to the other hosts' count


def test_synthetic_train_and_valid_differ(tok):
    a = D.synthetic_conversations(8, "train")
    assert a == D.synthetic_conversations(8, "train") and a != D.synthetic_conversations(8, "valid")
