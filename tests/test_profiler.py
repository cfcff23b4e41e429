"""The backward-cost profiler: FLOP counts (deterministic), never timings."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from bcd.lab import profiler
from bcd.lab.cli import main
from bcd.lab.presets import build_model, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_profile():
    torch.manual_seed(0)
    model = build_model(load_config("llama-tiny"), dtype=torch.float32, device="cpu")
    return profiler.profile(model, batch=2, seq=64, repeats=1, warmup=0,
                            partitioner_options={"include_embedding": True, "include_head": True})


def test_head_block_backward_is_a_small_fraction(tiny_profile):
    head = tiny_profile.blocks[-1]
    assert head.name == "head" and head.backward_flops_ratio < 0.2


def test_backward_flops_decrease_with_depth(tiny_profile):
    layers = [b for b in tiny_profile.blocks if b.name.startswith("model.layers.")]
    assert len(layers) == 8
    flops = [b.backward_flops for b in layers]
    assert all(a > b for a, b in zip(flops, flops[1:]))
    assert tiny_profile.full.backward_flops > flops[0]
    assert tiny_profile.none.backward_flops == 0 and tiny_profile.none.backward_time is None


def test_block_epoch_flops_match_the_refined_count(tiny_profile):
    epoch = tiny_profile.epoch
    assert epoch.blocks == 8
    assert epoch.refined == pytest.approx(10 / 32 + epoch.head_share)
    assert epoch.coarse == pytest.approx(9 / 16)
    assert abs(epoch.flops - epoch.refined) <= 0.1 * epoch.refined
    assert epoch.flops < epoch.coarse  # the paper's coarse count overestimates


def test_checkpointing_keeps_the_savings():
    torch.manual_seed(0)
    plain = build_model(load_config("llama-tiny"), dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    checkpointed = build_model(load_config("llama-tiny"), dtype=torch.float32, device="cpu")
    kwargs = dict(batch=2, seq=32, repeats=1, warmup=0, partitioner_options={"include_embedding": False})
    off = profiler.profile(plain, **kwargs)
    on = profiler.profile(checkpointed, use_checkpointing=True, **kwargs)
    assert on.checkpointing and checkpointed.is_activation_checkpointing
    for a, b in zip(off.blocks, on.blocks):
        # Checkpointing adds the recomputed forward of the layers backward passes through, and
        # nothing below: were backward to reach the frozen layers below, the top layer's cost
        # would jump towards the full backward.
        layers_run = sum(1 for x in off.blocks if x.name.startswith("model.layers.") and x.depth >= a.depth)
        per_layer_forward = (off.full.forward_flops - off.blocks[-1].backward_flops / 2) / 8
        assert a.backward_flops <= b.backward_flops <= a.backward_flops + layers_run * per_layer_forward * 1.01, a.name


def test_json_follows_the_documented_schema_and_csv_plot_tensorboard(tmp_path, capsys):
    out = tmp_path / "p.json"
    code = main(["profile", "--preset", "llama-tiny", "--batch", "1", "--seq", "16", "--repeats", "1", "--dtype", "fp32",
                 "--json", str(out), "--csv", str(tmp_path / "p.csv"), "--plot", str(tmp_path / "p.png"),
                 "--tensorboard", str(tmp_path / "tb")])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "paper's coarse count (D+1)/(2D)" in printed and "refined count (D+2)/(4D)" in printed
    # Not a terminal here: progress is a line per block in the output, not an invisible bar; stderr
    # is kept for a refusal's one line.
    assert "profiling counting FLOPs: embedding" in captured.out.splitlines()
    assert captured.err == ""
    document = json.loads(out.read_text())
    jsonschema.validate(document, json.loads((ROOT / "docs" / "profile.schema.json").read_text()))
    assert [b["name"] for b in document["blocks"]][0] == "embedding"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + len(document["blocks"]) + 2
    assert any((tmp_path / "tb").iterdir())


def test_schema_rejects_a_broken_document(tiny_profile):
    from bcd.lab import profile_report

    document = profile_report.to_dict(tiny_profile)
    schema = json.loads((ROOT / "docs" / "profile.schema.json").read_text())
    jsonschema.validate(document, schema)
    del document["epoch"]["refined"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


def test_unavailable_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=r"Unavailable device: 'cuda' \(torch.cuda.is_available\(\) is False here\); accepted: cpu"):
        profiler.check_device("cuda")


def test_profile_refuses_bad_batch():
    model = build_model(load_config("llama-tiny"), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"Invalid batch: 0; accepted: an integer >= 1"):
        profiler.profile(model, batch=0)


def test_repeats_that_disagree_are_warned_about(tiny_profile):
    import attrs

    from bcd.lab import profile_report
    from bcd.lab.profiler import Timing

    steady = attrs.evolve(tiny_profile, blocks=tuple(
        attrs.evolve(b, forward_time=Timing(median=1.0, min=1.0, max=1.5),
                     backward_time=None if b.backward_time is None else Timing(median=2.0, min=2.0, max=2.5))
        for b in tiny_profile.blocks))
    assert profile_report.spread_warning(steady) is None
    noisy = attrs.evolve(steady, blocks=(attrs.evolve(steady.blocks[0], backward_time=Timing(median=1.0, min=0.1, max=3.0)),
                                         *steady.blocks[1:]))
    warning = profile_report.spread_warning(noisy)
    assert warning.startswith("warning: repeats disagree up to 30.0x (max/min, embedding)")


def test_row_split_embedding_and_head_are_edges_in_the_prediction():
    """Every real LLM's embedding is larger than a layer: its row blocks ("head/3") are the head, not layers."""
    timing = profiler.Timing(median=1.0, min=1.0, max=1.0)

    def block(name, ratio):
        return profiler.BlockProfile(name=name, depth=0, params=1, forward_flops=1, backward_flops=1,
                                     backward_flops_ratio=ratio, forward_time=timing, backward_time=timing,
                                     backward_time_ratio=ratio, memory_delta=None)

    blocks = (block("embedding/0", 0.5), block("embedding/1", 0.5), block("model.layers.0", 0.6),
              block("model.layers.1", 0.3), block("head/0", 0.04), block("head/1", 0.02))
    epoch = profiler.predict_epoch(blocks)
    assert epoch.blocks == 2 and epoch.head_share == pytest.approx(0.03)
    assert epoch.flops == pytest.approx(0.45) and epoch.refined == pytest.approx(4 / 8 + 0.03)


def test_an_encoder_without_a_loss_is_profiled(tmp_path, capsys):
    """all-MiniLM-L6-v2's config names BertModel: no labels, no loss; every output is summed instead."""
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 64, "hidden_size": 16,
              "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["profile", "--config", str(tmp_path), "--batch", "1", "--seq", "8", "--repeats", "1", "--warmup", "0",
                 "--dtype", "fp32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "profiling counting FLOPs: encoder.layer.1" in captured.out and "profiling counting FLOPs: head" in captured.out
