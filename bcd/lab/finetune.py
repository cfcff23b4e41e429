"""Supervised fine-tuning on Alpaca-format instructions with the Trainer and bcd.BAdam.

The pieces of ``bcd finetune`` and ``examples/sft_trainer.py``: loading instruction data (a hub
name, a local json/jsonl file, or the bundled demo set), the Alpaca prompt template, tokenizing
with the prompt masked out of the labels, and the whole run with a summary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import torch
from bcd.lab.presets import tiny_llama

DEMO_DATA = Path(__file__).parent / "data" / "demo_instructions.jsonl"
IGNORE_INDEX = -100  # label id that the loss skips

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(example: dict[str, Any]) -> str:
    """The Alpaca prompt for one example (its ``input`` is optional)."""
    if example.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_WITHOUT_INPUT.format(instruction=example["instruction"])


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub name (``org/name`` or ``name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith((".json", ".jsonl"))


def load_instructions(source: str | Path | None = None):
    """Instruction data as a ``datasets.Dataset`` with ``instruction``, ``output`` and maybe ``input``.

    Args:
        source: None for the bundled demo set; a local ``.json``/``.jsonl`` file; or a dataset
            name on the Hugging Face hub (loaded with ``datasets.load_dataset``, split ``train``).

    Raises:
        ValueError: the data lacks the Alpaca columns, or the source cannot be loaded.
    """
    import datasets

    path = Path(source) if source is not None else DEMO_DATA
    if source is not None and looks_local(str(source)) and not path.is_file():
        raise ValueError(f"Invalid dataset: {str(source)!r} is no file; accepted: a local .json/.jsonl file of Alpaca "
                         "records, or a dataset name on the Hugging Face hub.")
    shown, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    # A one-file read needs no bar on stderr, where errors go; and datasets' own error log of a bad
    # file would be a second line beside the refusal, which names the cause itself.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if source is None or path.is_file():
            data = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            data = datasets.load_dataset(str(source), split="train")
    except Exception as error:  # datasets raises many types: name them all in one clear message
        cause = f" caused by {type(error.__cause__).__name__}: {error.__cause__}" if error.__cause__ else ""
        raise ValueError(
            f"Cannot load dataset {str(source)!r} ({type(error).__name__}: {error}{cause}); accepted: a local "
            ".json/.jsonl file of Alpaca records, or a dataset name on the Hugging Face hub (needs network)."
        ) from error
    finally:
        datasets.logging.set_verbosity(verbosity)
        if shown:
            datasets.enable_progress_bars()
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise ValueError(
            f"Invalid instruction data {str(path if source is None else source)!r}: columns {data.column_names}, "
            f"missing {sorted(missing)}; accepted: Alpaca records with 'instruction', 'output' and optional 'input'."
        )
    for column in ("instruction", "output", "input"):
        dtype = getattr(data.features.get(column), "dtype", "string")
        if dtype not in ("string", "large_string"):
            raise ValueError(
                f"Invalid instruction data {str(path if source is None else source)!r}: column {column!r} holds "
                f"{dtype} values; accepted: text."
            )
    return data


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` in a second, for models built from scratch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def tokenize(data, tokenizer, max_length: int):
    """Token ids with the prompt masked out of the labels: the loss is on the response only.

    Each example becomes ``prompt + output + eos``, cut to ``max_length``; labels are
    ``IGNORE_INDEX`` over the prompt.
    """

    def encode(example: dict[str, Any]) -> dict[str, list[int]]:
        prompt = tokenizer(format_prompt(example), add_special_tokens=False)["input_ids"]
        response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return data.map(encode, remove_columns=data.column_names)


def load_causal_lm(name: str, dtype: torch.dtype):
    """The tokenizer and causal language model of ``name`` (a local folder or a hub name), in ``dtype``.

    Raises:
        ValueError: no tokenizer there ("no tokenizer in DIR"), or the model is not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"Invalid model: no readable config in {name!r} ({' '.join(str(error).split())[:160]}); "
                         "accepted: a model folder with config.json, or a hub name (needs network).") from error
    architectures = getattr(config, "architectures", None) or []
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not causal):
        raise ValueError(
            f"Invalid model: {name!r} is not a causal LM (model_type {config.model_type!r}, architectures "
            f"{getattr(config, 'architectures', None)}); accepted: a causal language model (a ...ForCausalLM, e.g. "
            "Llama, Qwen2, GPT-2), which bcd finetune trains on instruction data."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"Invalid model: no tokenizer in {name!r} ({type(error).__name__}); accepted: a model folder "
                         "with its tokenizer files (tokenizer.json or tokenizer_config.json and vocabulary).") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


@attrs.frozen(kw_only=True)
class FinetuneSummary:
    """What a fine-tuning run did."""

    model: str
    dataset: str
    examples: int
    steps: int
    loss_before: float
    loss_after: float
    block_epochs: int
    blocks: int
    memory: dict[str, int]
    adamw_estimate: dict[str, int]
    output_dir: str
    tensorboard_dir: str | None
    seconds: float


def finetune(
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    output_dir: str = "runs/finetune",
    max_steps: int = 600,
    batch_size: int = 8,
    max_length: int = 128,
    learning_rate: float = 2e-3,
    switch_every: int | None = None,
    order: str = "random",
    expansion: str | None = "all",
    seed: int = 0,
    gradient_checkpointing: bool = False,
    tensorboard: bool = True,
    progress: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    lean: bool | str = False,
) -> FinetuneSummary:
    """Fine-tune with ``bcd.BAdam`` and the Trainer; see ``bcd finetune --help`` for the options."""
    import time

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback

    from bcd import plugins
    from bcd.lab import memory
    from bcd.checks import positive_int
    from bcd.lab.integrations.transformers import attach, badam_from_training_args

    for label, value in (("max_steps", max_steps), ("batch_size", batch_size), ("max_length", max_length)):
        positive_int(label, value)
    plugins.lookup("ordering", order)  # names are checked before any data is read or tokenizer trained
    if model_name is not None and looks_local(model_name) and not Path(model_name).expanduser().is_dir():
        raise ValueError(f"Invalid model: {model_name!r} is no local folder; accepted: a local model folder, or a "
                         "model name on the Hugging Face hub (needs network).")
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = load_instructions(dataset)
    if model_name is None:
        texts = [format_prompt(e) + e["output"] for e in data]
        tokenizer = train_tokenizer(texts)
        model = tiny_llama(vocab_size=len(tokenizer), layers=4, hidden=128, dtype=dtype)
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    else:
        tokenizer, model = load_causal_lm(model_name, dtype)
    split = tokenize(data, tokenizer, max_length).train_test_split(test_size=0.1, seed=seed)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20), max_grad_norm=1.0, logging_steps=max(1, max_steps // 20),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        use_cpu=not torch.cuda.is_available(), activation_checkpointing=gradient_checkpointing,
        disable_tqdm=not progress, dataloader_num_workers=0,
    )
    # bcd.BAdam's recipe for a run of max_steps: K for three block-epochs unless given, and the expansion.
    chosen = {"switch_every": switch_every} if switch_every is not None else {}
    optimizer = badam_from_training_args(model, args, order=order, seed=seed, expansion=expansion, lean=lean, **chosen)
    # Our own TensorBoard callback with its folder set: the Trainer's, first used by an evaluation
    # before train(), would open a writer with no folder (./runs/<date>_<host> under the cwd).
    tensorboard_dir = Path(output_dir).absolute() / "tensorboard"
    callbacks = []
    if tensorboard:
        callbacks.append(TensorBoardCallback())
        callbacks[0].logging_dir = str(tensorboard_dir)
    trainer = Trainer(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"], callbacks=callbacks,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
                      optimizers=(optimizer, None))
    attach(trainer)
    # Memory by category, the most held at any step (measured before each step, gradients in place).
    peak: dict[str, int] = {}

    def record(opt, args, kwargs) -> None:
        for key, value in attrs.asdict(memory.measure(model, opt).breakdown).items():
            peak[key] = max(peak.get(key, 0), value)

    handle = optimizer.register_step_pre_hook(record)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    handle.remove()
    loss_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    adamw = memory.estimate(model, methods=["adam"]).method("adam").breakdown
    return FinetuneSummary(
        model=model_name or "tiny Llama built from a config",
        dataset=str(dataset) if dataset else f"bundled demo set ({DEMO_DATA.name})",
        examples=len(data),
        steps=optimizer.global_step,
        loss_before=loss_before,
        loss_after=loss_after,
        block_epochs=optimizer.block_epoch,
        blocks=len(optimizer.blocks),
        memory=peak,
        adamw_estimate=attrs.asdict(adamw),
        output_dir=output_dir,
        tensorboard_dir=str(tensorboard_dir) if tensorboard else None,
        seconds=time.perf_counter() - started,
    )


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
