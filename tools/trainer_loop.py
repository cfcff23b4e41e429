"""One quality run through transformers' Trainer, as users run it (``bench_quality.py --loop trainer``).

What differs from the script loop of ``bench_quality.py`` is what the Trainer brings and a user
leaves at its default: its own AdamW (weight decay off biases and norms), its scheduler
(``--schedule``: ``linear``, the Trainer's default, or ``constant``), clipping at
``max_grad_norm=1.0``, its shuffling (``seed``), mixed precision (``bf16=True`` with ``--dtype
bf16``: autocast over AdamW's fp32 weights, over the bf16 model of LoRA and bcd) and, on several
ranks, DDP that accelerate wraps around the model after the optimizer exists. bcd's recipe is the
integration's one line, ``badam_from_training_args(model, args)``: only the rate (from ``args``)
and the run length (``max_steps``) are given. Rank 0 evaluates on the dev set from a callback.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

import bcd
from bcd.lab.memory import measure

#: The methods whose optimizer the Trainer builds itself (``optimizers=(None, None)``).
TRAINERS_OWN = ("adamw", "lora")


def unwrapped(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class Evaluation(TrainerCallback):
    """Dev accuracy on rank 0 every ``every`` steps and at the end; optimizer memory before those steps."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], float], every: int, steps: int, rank: int) -> None:
        self.evaluate, self.every, self.steps, self.rank = evaluate, every, steps, rank
        self.curve: list[tuple[int, float]] = []
        self.peak = 0

    def _due(self, step: int) -> bool:
        return self.rank == 0 and (step % self.every == 0 or step == self.steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._due(state.global_step + 1):  # gradients and solver state are both held here
            live = measure(model, unwrapped(optimizer))
            self.peak = max(self.peak, live.gradients + live.solver_state + live.master_copies)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._due(state.global_step):
            self.curve.append((state.global_step, self.evaluate(model)))


def train(method: str, model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int], lr: float,
          seed: int, args: argparse.Namespace, evaluate: Callable[[torch.nn.Module], float],
          optimizer_for: Callable, recipes: dict[str, dict], rank: int, world: int) -> dict:
    """Fine-tune ``model`` on (``texts``, ``labels``) with the Trainer; the dev curve, the optimizer and its memory.

    ``optimizer_for`` builds the optimizer of a method the Trainer does not build itself, unless
    ``recipes`` names it: those go through the integration with the keywords given there.
    """
    from datasets import Dataset

    encoded = tokenizer(texts, truncation=True, max_length=64)
    data = Dataset.from_dict({**encoded, "labels": labels})
    with tempfile.TemporaryDirectory() as folder:
        training = TrainingArguments(
            output_dir=folder, max_steps=args.steps, per_device_train_batch_size=args.batch // world,
            learning_rate=lr, weight_decay=0.01, lr_scheduler_type=args.schedule, bf16=args.dtype == "bf16",
            seed=seed, data_seed=seed, use_cpu=True, save_strategy="no", logging_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_num_workers=0,
            # The Trainer multiplies the loss by the world size for a model whose forward takes **kwargs,
            # expecting the loss to be divided by the tokens of all ranks; a classifier's loss is its own
            # batch's mean, so the default would average world-size times the gradient over ranks.
            average_tokens_across_devices=False)
        if method in TRAINERS_OWN:
            if method == "lora":
                model = optimizer_for(method, model, lr, seed, args)[0]  # peft's wrapper, the Trainer's AdamW
            optimizer = None
        elif method in recipes:  # the integration's one line (the rate and the run length from args), and a variant's keywords
            from bcd.lab.integrations.transformers import badam_from_training_args

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", bcd.PrecisionNote)
                optimizer = badam_from_training_args(model, training, seed=seed, **recipes[method])
        else:
            model, optimizer, _ = optimizer_for(method, model, lr, seed, args)
        callback = Evaluation(evaluate, args.eval_every, args.steps, rank)
        trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                          optimizers=(optimizer, None), callbacks=[callback])
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"curve": callback.curve, "seconds": seconds, "optimizer_bytes": callback.peak,
            "optimizer": unwrapped(trainer.optimizer)}
