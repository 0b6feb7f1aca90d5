"""Chat templates for building training examples, as the original L2D training renders them.

Two named templates (the original's ``specified_template_type`` values), written here as
Jinja for ``tokenizer.apply_chat_template(..., chat_template=...)``:

- ``fixed_date_llama3``: the Llama 3.1 / 3.2 Instruct chat format with the date lines fixed
  to "Cutting Knowledge Date: December 2023" / "Today Date: 26 Jul 2024" (the stock Llama 3.2
  template prints today's date, so prompts would change from day to day). Plain
  ``{"role", "content"}`` messages only: contents are trimmed, a leading system message goes
  into the (always present) system header, tool calls are not supported.
- ``base_llama``: a plain format for base (non-instruct) models, without BOS:
  ``"### Question ###\\n{user}\\n"`` and ``"### Answer ###\\n{assistant}\\n"`` per turn, other
  roles skipped, and ``"### Answer ###\\n"`` as the generation prompt.

What the original TRAINING data actually used (``train_data_template``):
the original's SmolTalk processor passes the named template to ``apply_chat_template`` as
``specified_template=...``, a keyword transformers does not know and hands to the template
as an unused variable. So training data was rendered with the TOKENIZER'S OWN chat
template, and (the original's ``build_tokenizer``) with ``date_string="26 Jul 2024"`` when
the tokenizer directory names a Llama model. The evaluation tasks do pass
``chat_template=`` and so use the named template. ``train_data_template="original"``
reproduces this (for the released Llama 3.x Instruct configs the two renderings agree; for
``llama_3.1_8b_instruct_lad_lora`` the training data is in the Llama 3.1 chat format although
its evaluation uses ``base_llama``); ``"specified"`` applies ``specified_template_type`` to the
training data too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from l2d_jax.errors import L2DError

FIXED_DATE = "26 Jul 2024"
KNOWLEDGE_CUTOFF = "December 2023"

# Every piece of output text is a Jinja string expression (HF renders with trim_blocks and
# lstrip_blocks, which would eat literal newlines next to block tags).
FIXED_DATE_LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: " + KNOWLEDGE_CUTOFF + "\\n' }}"
    "{{- 'Today Date: " + FIXED_DATE + "\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

BASE_LLAMA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '### Question ###\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '### Answer ###\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '### Answer ###\\n' }}"
    "{%- endif %}"
)

TEMPLATES: dict[str, str] = {"fixed_date_llama3": FIXED_DATE_LLAMA3, "base_llama": BASE_LLAMA}
TRAIN_DATA_TEMPLATE_MODES = ("original", "specified")


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation prefix becomes the context string.

    ``chat_template`` None means the tokenizer's own template; ``template_kwargs`` are extra
    variables for the template (``date_string``)."""

    chat_template: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "tokenizer"

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise L2DError("the tokenizer has no chat template; set specified_template_type "
                           f"(one of {sorted(TEMPLATES)}) with train_data_template='specified'")
        return tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **self.template_kwargs)


def named_template(name: str | None) -> str | None:
    """The Jinja text of a ``specified_template_type`` (None / "" -> None)."""
    if not name:
        return None
    if name not in TEMPLATES:
        raise L2DError(f"specified_template_type={name!r} is unknown; use one of {sorted(TEMPLATES)} "
                       "or leave it unset (the tokenizer's own chat template)")
    return TEMPLATES[name]


def is_llama_tokenizer(tokenizer_dir: str | None, tokenizer=None) -> bool:
    """The original's test for its fixed-date patch: a Llama tokenizer class or 'llama' in the dir."""
    name = type(tokenizer).__name__ if tokenizer is not None else ""
    return name.startswith("LlamaTokenizer") or "llama" in (tokenizer_dir or "").lower()


def training_chat_format(specified_template_type: str | None, train_data_template: str,
                         tokenizer_dir: str | None, tokenizer=None) -> ChatFormat:
    """The chat format for training / validation examples (see the module docstring)."""
    if train_data_template not in TRAIN_DATA_TEMPLATE_MODES:
        raise L2DError(f"train_data_template={train_data_template!r}; use one of {TRAIN_DATA_TEMPLATE_MODES}")
    kwargs = {"date_string": FIXED_DATE} if is_llama_tokenizer(tokenizer_dir, tokenizer) else {}
    if train_data_template == "specified" and specified_template_type:
        return ChatFormat(named_template(specified_template_type), kwargs, specified_template_type)
    named_template(specified_template_type)  # still reject unknown names
    return ChatFormat(None, kwargs, "tokenizer" + (" (date_string fixed)" if kwargs else ""))


def eval_chat_format(specified_template_type: str | None, tokenizer_dir: str | None,
                     tokenizer=None) -> ChatFormat:
    """The chat format of the original's evaluation tasks: the named template when given."""
    kwargs = {"date_string": FIXED_DATE} if is_llama_tokenizer(tokenizer_dir, tokenizer) else {}
    return ChatFormat(named_template(specified_template_type), kwargs,
                      specified_template_type or "tokenizer")
