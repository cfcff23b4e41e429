"""bcd.BAdam's defaults train every parameter of tiny models from many transformers families.

Vocabularies are large beside the layers (1024 x 32 against ~8K per layer), so the default
``layer`` partition splits embeddings and heads into row blocks, as it does Llama-3-8B's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import bcd
from bcd import testing
from bcd.rowgrad import ROWS

VOCAB, WIDTH, LAYERS, HEADS = 1024, 32, 2, 4
DECODER = {"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": 64}
ENCODER = {"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "max_position_embeddings": 64, "num_labels": 3}
SEQ2SEQ = {"vocab_size": VOCAB, "d_model": WIDTH, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
           "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "encoder_ffn_dim": 64,
           "decoder_ffn_dim": 64, "max_position_embeddings": 64}

# family: (model class, config class, config options, kind of loss)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", DECODER, "causal"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**DECODER, "head_dim": 8}, "causal"),
    "qwen3-moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  {**DECODER, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "decoder_sparse_step": 1}, "causal"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
                "causal"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**DECODER, "head_dim": 8}, "causal"),  # tied head
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**DECODER, "head_dim": 8}, "causal"),
    "phi": ("PhiForCausalLM", "PhiConfig", DECODER, "causal"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {"vocab_size": VOCAB, "n_embd": WIDTH, "n_layer": LAYERS, "n_head": HEADS,
                                               "n_positions": 64}, "causal"),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
                 "causal"),
    "opt": ("OPTForCausalLM", "OPTConfig", {"vocab_size": VOCAB, "hidden_size": WIDTH, "ffn_dim": 64,
                                            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                            "word_embed_proj_dim": WIDTH, "max_position_embeddings": 64}, "causal"),
    "bloom": ("BloomForCausalLM", "BloomConfig", {"vocab_size": VOCAB, "hidden_size": WIDTH, "n_layer": LAYERS,
                                                  "n_head": HEADS}, "causal"),
    "falcon": ("FalconForCausalLM", "FalconConfig", {"vocab_size": VOCAB, "hidden_size": WIDTH,
                                                     "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}, "causal"),
    "t5": ("T5ForConditionalGeneration", "T5Config", {"vocab_size": VOCAB, "d_model": WIDTH, "d_ff": 64, "d_kv": 8,
                                                      "num_layers": LAYERS, "num_heads": HEADS, "decoder_start_token_id": 0},
           "seq2seq"),
    "bart": ("BartForConditionalGeneration", "BartConfig", SEQ2SEQ, "seq2seq"),
    "bert-classifier": ("BertForSequenceClassification", "BertConfig", ENCODER, "classify"),
    "roberta-classifier": ("RobertaForSequenceClassification", "RobertaConfig", ENCODER, "classify"),
    "deberta-v2-classifier": ("DebertaV2ForSequenceClassification", "DebertaV2Config", ENCODER, "classify"),
}
K = 2


def build(family: str) -> torch.nn.Module:
    model_class, config_class, options, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**options)
    return getattr(transformers, model_class)(config).to(torch.bfloat16)


def loss_for(family: str):
    kind = FAMILIES[family][3]

    def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step)
        ids = torch.randint(4, VOCAB, (2, 12), generator=generator)
        if kind == "classify":
            return model(input_ids=ids, labels=torch.randint(0, 3, (2,), generator=generator)).loss
        if kind == "seq2seq":
            return model(input_ids=ids, labels=torch.randint(4, VOCAB, (2, 6), generator=generator)).loss
        return model(input_ids=ids, labels=ids).loss
    return loss


def test_at_least_fifteen_families_with_a_moe_a_tied_head_encoder_decoders_and_classifiers():
    kinds = {spec[3] for spec in FAMILIES.values()}
    assert len(FAMILIES) >= 15 and kinds == {"causal", "seq2seq", "classify"}
    assert {"qwen3-moe", "mixtral", "gemma", "gpt2"} <= set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_defaults_train_every_parameter_and_nothing_else(family: str):
    model = build(family)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = bcd.BAdam(model, lr=1e-2, switch_every=K, order="random", seed=1)
    names = {n for n, _ in model.named_parameters() if not n.endswith(ROWS)}  # not the active rows (bcd.rowgrad)
    assert set(optimizer.blocks.tensor_names) == names  # every parameter is in a block (tied ones once)
    if family != "deberta-v2-classifier":  # its relative embeddings are larger than its layers too
        assert any(block.name.startswith("embedding/") for block in optimizer.blocks), "the embedding is split by rows"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model-specific notes (e.g. attention implementation)
        # Each step: only the active block (and its rows) changed, it did, the rest is bit-identical.
        testing.check_invariants(model, optimizer, loss_for(family), steps=K * len(optimizer.blocks))
    unchanged = [n for n, p in initial.items() if torch.equal(model.get_parameter(n), p)]
    assert not unchanged, f"not trained within one block-epoch: {unchanged}"
