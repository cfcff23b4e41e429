"""TRL's SFTTrainer (a Trainer) with bcd: it trains, and resumes mid-block bit for bit. Skipped without trl."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from bcd.lab.finetune import train_tokenizer  # noqa: E402
from bcd.lab.integrations.transformers import _unwrap, attach, badam_from_training_args  # noqa: E402
from bcd.lab.presets import tiny_llama  # noqa: E402

TEXTS = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(4)]


def run(output_dir, tokenizer, resume: str | None = None, save_steps: int = 100):
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer), layers=2, hidden=32, dtype=torch.bfloat16)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    args = trl.SFTConfig(output_dir=str(output_dir), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_steps=save_steps, report_to=[], use_cpu=True, seed=0, data_seed=0,
                         dataloader_num_workers=0, disable_tqdm=True, max_length=32)
    optimizer = badam_from_training_args(model, args, switch_every=3, order="random", seed=1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer, optimizers=(optimizer, None))
    attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, model, trainer


def test_sft_trainer_trains_and_resumes_mid_block_bit_identically(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    uninterrupted, reference, whole = run(tmp_path / "a", tokenizer)
    assert _unwrap(whole.optimizer).switches >= 3 and uninterrupted[-1] < uninterrupted[0]
    run(tmp_path / "b", tokenizer, save_steps=4)  # K = 3: step 4 is mid-block
    resumed, model, _ = run(tmp_path / "b", tokenizer, resume=str(tmp_path / "b" / "checkpoint-4"), save_steps=4)
    assert resumed == uninterrupted  # the checkpoint carries the first 4 steps' log
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
