"""Supervised fine-tuning with the transformers Trainer and bcd.BAdam, written out.

Alpaca-format data (a hub name, a local json/jsonl file, or bcd's bundled demo set), the Alpaca
prompt template with the prompt masked out of the labels, gradient checkpointing, TensorBoard.
`bcd finetune` runs the same with a summary; this script shows the moving parts.

    python examples/sft_trainer.py                                   # tiny Llama, bundled data, CPU
    python examples/sft_trainer.py --model path/to/model --dataset alpaca.json --steps 1000
    torchrun --nproc-per-node 2 examples/sft_trainer.py       # DDP, added by the Trainer
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from bcd.lab.finetune import IGNORE_INDEX, format_prompt, load_instructions, tokenize, train_tokenizer
from bcd.lab.presets import tiny_llama
from bcd.lab.integrations.transformers import attach, badam_from_training_args


def main() -> None:
    parser = argparse.ArgumentParser(description="SFT with the Trainer and bcd.BAdam.")
    parser.add_argument("--model", help="local model directory or hub name (default: tiny Llama from a config)")
    parser.add_argument("--dataset", help="local .json/.jsonl or hub name (default: bundled demo instructions)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--output-dir", default="runs/sft", help="output directory (default runs/sft)")
    args = parser.parse_args()

    data = load_instructions(args.dataset)
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    else:
        tokenizer = train_tokenizer([format_prompt(e) + e["output"] for e in data])
        model = tiny_llama(vocab_size=len(tokenizer), layers=4, hidden=128, dtype=torch.bfloat16)
    train_data = tokenize(data, tokenizer, max_length=256)

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=10,
        max_grad_norm=1.0, weight_decay=0.01, logging_steps=10, save_steps=100,
        activation_checkpointing=True,  # bcd keeps the backward savings with it on
        ddp_find_unused_parameters=True,  # several processes: the frozen blocks are DDP's unused parameters
        report_to=["tensorboard"], use_cpu=not torch.cuda.is_available(),
    )
    # lr, weight decay (biases and norms exempt), betas and eps come from the TrainingArguments.
    optimizer = badam_from_training_args(model, training_args, switch_every=25, order="random")
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
        optimizers=(optimizer, None),  # the Trainer's own cosine schedule drives bcd's param_groups
    )
    attach(trainer)  # active block, switches, memory by category in every log
    trainer.train()  # trainer.train(resume_from_checkpoint=True) resumes the block schedule exactly
    trainer.save_model()
    tokenizer.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
