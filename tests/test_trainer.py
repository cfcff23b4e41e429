"""bcd with the transformers Trainer: exact resume, the TrainingArguments helper, the callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerState, TrainingArguments

import bcd
from bcd.lab.integrations.transformers import (ShortRunWarning, _unwrap, BlockCoordinateCallback, attach,
                                          badam_from_training_args)

from conftest import tiny_llama


def dataset() -> Dataset:
    ids = torch.randint(0, 64, (24, 12), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.5,
        lr_scheduler_type="cosine", learning_rate=1e-2, weight_decay=0.1, max_steps=10, logging_steps=1,
        save_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def run(args: TrainingArguments, resume: str | None = None, **options):
    torch.manual_seed(0)
    model = tiny_llama(layers=3).to(torch.bfloat16)
    optimizer = badam_from_training_args(model, args, switch_every=3, order="random", seed=1, **options)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None))
    attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, model, trainer


@pytest.mark.parametrize("max_block_params", [None, 600], ids=["whole-tensors", "row-blocks"])
def test_resume_from_a_mid_block_checkpoint_is_bit_identical(tmp_path, max_block_params):
    # row-blocks: the embedding and the head (64 x 16) in two row blocks each, trained by rows (bcd.rowgrad)
    options = {"max_block_params": max_block_params}
    uninterrupted, reference, whole = run(arguments(tmp_path / "a"), **options)
    run(arguments(tmp_path / "b", save_steps=4), **options)  # K = 3: step 4 is mid-block
    resumed, model, trainer = run(arguments(tmp_path / "b", save_steps=4), resume=str(tmp_path / "b" / "checkpoint-4"),
                                  **options)
    assert resumed == uninterrupted
    assert any(name.startswith("head/") for name in (b.name for b in _unwrap(trainer.optimizer).blocks)) == (
        max_block_params is not None)
    # bcd/switches goes on from the checkpoint's count, not from 0.
    assert _unwrap(trainer.optimizer).switches == _unwrap(whole.optimizer).switches > 0
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    saved = torch.load(tmp_path / "b" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    schedule = bcd.layout.header(saved)["schedule"]
    assert schedule["step_in_block"] == 1 and schedule["global_step"] == 4


def test_training_arguments_reach_the_optimizer(tmp_path):
    args = arguments(tmp_path, learning_rate=3e-4, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    optimizer = badam_from_training_args(tiny_llama(layers=2), args, switch_every=7)
    assert isinstance(optimizer, bcd.BAdam) and optimizer.switch_every == 7
    decayed, exempt = optimizer.param_groups
    assert (decayed["lr"], decayed["betas"], decayed["eps"], decayed["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.05)
    assert exempt["weight_decay"] == 0.0 and all(p.ndim == 1 for p in exempt["params"])


def test_callback_logs_block_and_memory_to_the_trainers_loggers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = arguments(tmp_path, report_to=["tensorboard"], max_steps=8)
    _, _, trainer = run(args)
    assert isinstance(trainer.callback_handler.callbacks[0], BlockCoordinateCallback)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/bcd/active_block", "train/bcd/memory_solver_state_MB", "train/loss"} <= set(events.Tags()["scalars"])
    # One per logging step, and once more with the end-of-training summary.
    assert [e.value for e in events.Scalars("train/bcd/step_in_block")] == [1, 2, 0, 1, 2, 0, 1, 2, 2]
    assert events.Scalars("train/bcd/switches")[-1].value == 2
    assert [e.value for e in events.Scalars("train/bcd/switch_every")] == [3]
    assert [e.value for e in events.Scalars("train/bcd/blocks")] == [5]  # embedding, 3 layers, head
    assert events.Scalars("train/bcd/memory_master_copies_MB")[-1].value > 0


def test_gradient_checkpointing_through_the_trainer(tmp_path):
    plain, reference, _ = run(arguments(tmp_path / "a", max_steps=4))
    checkpointed, model, _ = run(arguments(tmp_path / "b", max_steps=4, gradient_checkpointing=True))
    assert model.is_activation_checkpointing and not getattr(model, "_require_grads_hooks", None)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert checkpointed == plain


def test_bf16_mixed_precision_argument_trains(tmp_path):
    torch.manual_seed(0)
    initial = {n: p.detach().to(torch.bfloat16) for n, p in tiny_llama(layers=3).named_parameters()}
    losses, model, trainer = run(arguments(tmp_path, bf16=True, max_steps=6))
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # K = 3, 6 steps: two of the five blocks visited; with max_steps the recipe's expansion moves the
    # other three too, every bf16 step stochastically rounded (a rounded-to-nearest one would vanish).
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, initial[n])]
    assert changed == list(initial)


def test_the_recipe_follows_the_run_length_and_accumulation(tmp_path):
    """max_steps turns on bcd.BAdam's recipe; one process divides the expansion's scale by the micro-batches."""
    model = tiny_llama(layers=2)
    recipe = badam_from_training_args(model, arguments(tmp_path, max_steps=120, gradient_accumulation_steps=4))
    assert (recipe.switch_every, recipe.expansion.reach, recipe.expansion.scale) == (10, "all", 0.25 / 4)
    recipe.close()
    assert badam_from_training_args(model, arguments(tmp_path, max_steps=120, gradient_accumulation_steps=1)).expansion.scale == 0.25
    by_epochs = badam_from_training_args(model, arguments(tmp_path, max_steps=-1, num_train_epochs=1))
    assert (by_epochs.switch_every, by_epochs.expansion) == (100, None)
    # FSDP2 shards the weights after the optimizer is built, and sharded weights are not expanded:
    # the run length still sets K, without the expansion.
    fsdp2 = badam_from_training_args(model, arguments(tmp_path, max_steps=120, fsdp=True, save_steps=10))
    assert (fsdp2.switch_every, fsdp2.expansion) == (10, None)


def test_the_trainers_fsdp1_is_refused_and_fsdp2_needs_saves_on_visit_boundaries(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"FSDP version 1 .*FSDP.optim_state_dict.* Accepted: FSDP2"):
        badam_from_training_args(tiny_llama(layers=2), arguments(tmp_path, fsdp=True, fsdp_config={"version": 1}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match=r"FSDP version 1"):  # accelerate's default version
        badam_from_training_args(tiny_llama(layers=2), arguments(tmp_path))
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert badam_from_training_args(tiny_llama(layers=2), arguments(tmp_path, save_steps=6), switch_every=3)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")

    model = tiny_llama(layers=2)
    fsdp2 = arguments(tmp_path, fsdp=True, save_steps=4)  # transformers' default version: 2
    with pytest.raises(ValueError, match=r"save_steps=4 with switch_every=3 under the Trainer's FSDP2.* Accepted: "
                                         r"save_steps a multiple of switch_every \(e.g. 3\)"):
        badam_from_training_args(model, fsdp2, switch_every=3)
    assert all(p.requires_grad for p in model.parameters())  # refused: the model is as it was
    optimizer = badam_from_training_args(model, fsdp2, switch_every=2)
    # A bare optimizer in a Trainer (an FSDP Trainer needs several processes: its parts stand in here).
    trainer = SimpleNamespace(args=arguments(tmp_path, fsdp=True, save_steps=5), optimizer=optimizer,
                              callback_handler=SimpleNamespace(callbacks=[]))
    with pytest.raises(ValueError, match=r"save_steps=5 with switch_every=2"):
        attach(trainer)
    with pytest.raises(ValueError, match=r"save_steps=6 with switch_every=4"):  # the resolved steps, at train begin
        BlockCoordinateCallback().on_train_begin(arguments(tmp_path, fsdp=True, save_steps=0.5), TrainerState(save_steps=6),
                                                 None, optimizer=badam_from_training_args(model, fsdp2, switch_every=4))


def test_evaluate_returns_the_models_metrics_only(tmp_path):
    """The callback adds bcd/* entries to training logs, not to the metrics evaluate() returns."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    args = arguments(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(),
                      optimizers=(badam_from_training_args(model, args, switch_every=3), None))
    attach(trainer)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and not any(key.startswith("bcd/") for key in metrics)


def test_a_run_shorter_than_one_block_epoch_is_warned_about(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(layers=2)  # D = 4
    args = arguments(tmp_path, max_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      optimizers=(badam_from_training_args(model, args, switch_every=3), None))
    attach(trainer)
    with pytest.warns(ShortRunWarning, match=r"5 steps are fewer than one block-epoch \(K x D = 3 x 4 = 12\): 2 of the 4 "
                                             r"blocks will never be trained. Accepted: switch_every <= 1"):
        trainer.train()


def test_the_run_length_sets_k_when_none_is_given(tmp_path):
    model = tiny_llama(layers=2)  # D = 4
    assert badam_from_training_args(model, arguments(tmp_path, max_steps=120)).switch_every == 10  # 120 // (3 x 4)
    assert badam_from_training_args(model, arguments(tmp_path, max_steps=120), switch_every=7).switch_every == 7
    assert badam_from_training_args(model, arguments(tmp_path, max_steps=-1, num_train_epochs=1)).switch_every == 100
