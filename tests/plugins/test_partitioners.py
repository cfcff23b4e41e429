"""Built-in partitioners on real model structures."""

from __future__ import annotations

import pytest
from torch import nn

from bcd import plugins

from conftest import CASES, MLP


def partition(model, name="layer", **options):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return plugins.create("partitioner", name, options).partition(model, params, 0)


def names(p):
    return [b.name for b in p]


@pytest.mark.parametrize(
    "case_name,expected",
    [
        ("llama", ["embedding", "model.layers.0", "model.layers.1", "head"]),
        ("gpt2", ["embedding", "transformer.h.0", "transformer.h.1", "head"]),
        ("bert", ["embedding", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]),
        ("mlp", ["embedding", "layers.0", "layers.1", "layers.2", "head"]),
    ],
)
def test_layer_finds_the_stack_whatever_it_is_called(case_name, expected):
    model = CASES[case_name].model()
    result = partition(model)
    assert names(result) == expected
    assert sorted(result.param_names) == sorted(n for n, _ in model.named_parameters())


def test_layer_gpt2_blocks_content_and_tied_head_counted_once():
    model = CASES["gpt2"].model()
    assert model.lm_head.weight is model.transformer.wte.weight
    result = partition(model)
    assert result[0].param_names == ("transformer.wte.weight", "transformer.wpe.weight")
    assert result[-1].param_names == ("transformer.ln_f.weight", "transformer.ln_f.bias")
    assert all(n.startswith("transformer.h.0.") for n in result[1].param_names)


def test_layer_bert_keeps_embedding_norm_with_the_embeddings():
    result = partition(CASES["bert"].model())
    assert "bert.embeddings.LayerNorm.weight" in result[0].param_names
    assert set(result[-1].param_names) == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"
    }


def test_layer_encoder_decoder_models_get_both_stacks():
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=3,
                                             num_heads=2, d_kv=8, decoder_start_token_id=0))
    assert names(partition(t5)) == [
        "embedding", "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1", "decoder.block.2", "head"
    ]
    bart = BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    result = partition(bart)
    assert names(result)[1:5] == ["model.encoder.layers.0", "model.encoder.layers.1",
                                  "model.decoder.layers.0", "model.decoder.layers.1"]
    # The decoder's position embedding is an nn.Embedding registered after the encoder stack.
    assert "model.decoder.embed_positions.weight" in result[0].param_names


def test_layer_plain_sequential_and_modulelist_models():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert names(partition(seq)) == ["0", "2", "3", "4"]
    stack = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    assert names(partition(stack)) == ["0", "1", "2"]


def test_layer_options_leave_embedding_and_head_out():
    result = partition(CASES["llama"].model(), include_embedding=False, include_head=False)
    assert names(result) == ["model.layers.0", "model.layers.1"]


def test_layer_moe_experts_stay_inside_their_layer():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Layer() for _ in range(2))

    assert names(partition(Model())) == ["blocks.0", "blocks.1"]


def test_layer_without_a_stack_is_a_clear_error():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Conv1d(2, 2, 1)

    with pytest.raises(ValueError, match=r"no repeated layer stack .* found in Flat; use the 'per-module'"):
        partition(Flat())


def test_random_subset_is_seeded_balanced_and_redraws():
    model = CASES["llama"].model()
    first = partition(model, "random-subset", num_blocks=3, seed=1)
    assert first == partition(model, "random-subset", num_blocks=3, seed=1)
    assert first != partition(model, "random-subset", num_blocks=3, seed=2)
    params = dict(model.named_parameters())
    sizes = [sum(params[n].numel() for n in b.param_names) for b in first]
    largest = max(p.numel() for p in params.values())
    assert max(sizes) - min(sizes) <= largest  # greedy balance: within one tensor
    redraw = plugins.create("partitioner", "random-subset", {"num_blocks": 3, "seed": 1, "redraw": True})
    assert redraw.dynamic
    assert redraw.partition(model, params, 0) != redraw.partition(model, params, 1)
    with pytest.raises(ValueError, match=r"num_blocks: 0; accepted: an integer >= 1"):
        partition(model, "random-subset", num_blocks=0)
    with pytest.raises(ValueError, match=r"num_blocks: 999; the model has only 21 trainable parameter tensors"):
        partition(model, "random-subset", num_blocks=999)


def test_per_module_gives_the_papers_attention_mlp_split():
    model = CASES["llama"].model()
    result = partition(model, "per-module", modules=["LlamaAttention", "LlamaMLP"], rest="freeze")
    assert names(result) == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    with_rest = partition(model, "per-module", modules=["LlamaAttention", "LlamaMLP"])
    assert names(with_rest)[-1] == "rest" and "model.embed_tokens.weight" in with_rest[-1].param_names


def test_per_module_by_class_and_errors():
    result = partition(MLP(), "per-module", modules=nn.Linear)
    assert names(result) == ["inp", "layers.0", "layers.1", "layers.2", "out"]
    with pytest.raises(ValueError, match=r"match no module holding trainable parameters; module classes in this model: Linear, MLP, ModuleList"):
        partition(MLP(), "per-module", modules=["Conv2d"])
    with pytest.raises(ValueError, match=r"rest: 'drop'; accepted: 'block', 'freeze'"):
        partition(MLP(), "per-module", modules=["Linear"], rest="drop")


def test_explicit_patterns_and_list_form():
    model = MLP()
    result = partition(model, "explicit", blocks=[["layers.*", "inp.*"], ["out.*"]])
    assert names(result) == ["block.0", "block.1"]
    assert result[0].param_names[:2] == ("inp.weight", "inp.bias")  # model order, whatever the patterns' order


def test_frozen_parameters_are_not_candidates():
    model = MLP()
    model.inp.requires_grad_(False)
    result = partition(model)
    assert "inp.weight" not in result.param_names and names(result)[0] == "layers.0"
