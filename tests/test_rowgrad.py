"""Row gradients: a row block of the head or the embedding computes its rows' gradient only."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bcd
from bcd import rowgrad
from bcd.lab import presets
from bcd.rowgrad import ROWS

VOCAB, HIDDEN, TOKENS = 512, 32, (2, 8)


class Head(nn.Linear):
    """An nn.Linear with a forward of its own: bcd cannot know it is the plain product, so it
    trains the whole tensor and zeroes the other rows' gradient (the path before row gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids)


def llama(dtype: torch.dtype = torch.float32, whole_tensors: bool = False) -> nn.Module:
    """A tiny untied Llama whose embedding and head (512 x 32) are each larger than a layer."""
    torch.manual_seed(0)
    model = presets.tiny_llama(vocab_size=VOCAB, hidden=HIDDEN, layers=2, heads=4, kv_heads=2, dtype=dtype)
    if whole_tensors:
        head, embedding = model.lm_head, model.model.embed_tokens
        model.lm_head = Head(HIDDEN, VOCAB, bias=False, dtype=dtype)
        model.lm_head.weight = head.weight
        model.model.embed_tokens = Embedding(VOCAB, HIDDEN, dtype=dtype)
        model.model.embed_tokens.weight = embedding.weight
    return model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, TOKENS, generator=torch.Generator().manual_seed(step))


def optimizer_for(model: nn.Module, **options) -> bcd.BlockCoordinateOptimizer:
    return bcd.BAdam(model, lr=1e-2, **{"switch_every": 2, "order": "ascending", **options})


def train(model: nn.Module, steps: int, micro_batches: int = 1, **options) -> bcd.BlockCoordinateOptimizer:
    optimizer = optimizer_for(model, **options)
    for step in range(steps):
        for micro in range(micro_batches):
            ids = batch(step * micro_batches + micro)
            (model(input_ids=ids, labels=ids).loss / micro_batches).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # as the Trainer: over model.parameters()
        assert norm > 0.01  # every step is clipped: the norm decides the step
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_row_blocks_of_the_head_and_embedding_get_their_rows_own_gradient():
    model = llama()
    assert set(rowgrad.owners(model, ["model.embed_tokens.weight", "lm_head.weight"])) == {
        "model.embed_tokens.weight", "lm_head.weight"}
    optimizer = optimizer_for(model, switch_every=1)
    seen = set()
    for step in range(len(optimizer.blocks)):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        for name, spans in optimizer.active_block.row_spans.items():
            (a, b), = spans
            module = model.get_submodule(name.rpartition(".")[0])
            rows = getattr(module, ROWS)
            assert model.get_parameter(name).grad is None and not model.get_parameter(name).requires_grad
            # The gradient tensor has the block's shape: the other rows' gradient was never computed.
            assert rows.grad.shape == (b - a, HIDDEN) and rows.grad.abs().sum() > 0
            assert rows.data_ptr() == model.get_parameter(name)[a].data_ptr()  # a view of the weight
            seen.add(name)
        optimizer.step()
        optimizer.zero_grad()
    assert seen == {"model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("expansion", [None, "all"], ids=["plain", "expansion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_block_epoch_with_accumulation_and_clipping_equals_the_whole_tensor_path_bit_for_bit(dtype, expansion):
    # Two block-epochs, two micro-batches a step, clipped over model.parameters() (at a norm every
    # step exceeds): the rows' gradient takes part in the norm as the whole tensor's zeroed-elsewhere
    # gradient did. With the expansion, a weight it stepped on the visit before stays frozen.
    rows, whole = llama(dtype), llama(dtype, whole_tensors=True)
    heads = ["model.embed_tokens.weight", "lm_head.weight"]
    assert len(rowgrad.owners(rows, heads)) == 2 and not rowgrad.owners(whole, heads)  # one path each
    steps = 2 * 2 * len(optimizer_for(llama(dtype)).blocks)
    options = {"expansion": expansion, "total_steps": steps} if expansion else {}
    assert train(rows, steps, micro_batches=2, **options).expansion is not None or not expansion
    train(whole, steps, micro_batches=2, **options)
    for name, param in whole.named_parameters():
        assert torch.equal(rows.get_parameter(name), param), name


def test_the_heads_gradient_flops_drop_by_the_inactive_share():
    def backward_flops(model: nn.Module) -> int:
        ids = batch(0)
        loss = model(input_ids=ids, labels=ids).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return counter.get_total_flops()

    counts = []
    for whole_tensors in (False, True):
        model = llama(whole_tensors=whole_tensors)
        optimizer = optimizer_for(model, order="descending")  # the head's last row block first
        assert optimizer.active_block.name == "head/1"
        (a, b), = optimizer.active_block.row_spans["lm_head.weight"]
        counts.append(backward_flops(model))
    tokens = TOKENS[0] * TOKENS[1]
    # The weight gradient's product, 2 * tokens * hidden per row, for the inactive rows only.
    assert counts[1] - counts[0] == 2 * tokens * HIDDEN * (VOCAB - (b - a))


def test_the_rows_stay_out_of_state_dict_and_load_state_dict_while_registered():
    model = llama()
    optimizer = optimizer_for(model, order="descending")
    assert hasattr(model.lm_head, ROWS)
    names = {n for n, _ in model.named_parameters() if not n.endswith(ROWS)}
    saved = model.state_dict()
    assert set(saved) == names
    with torch.no_grad():
        changed = {k: v + 1 for k, v in saved.items()}
    model.load_state_dict(changed)  # strict: the rows are not asked for
    (a, b), = optimizer.active_block.row_spans["lm_head.weight"]
    assert torch.equal(getattr(model.lm_head, ROWS), changed["lm_head.weight"][a:b])  # they read the weight


def test_close_gives_the_modules_back_as_they_were():
    model = llama()
    optimizer = optimizer_for(model, order="descending")
    assert "forward" in vars(model.lm_head)
    optimizer.close()
    assert not hasattr(model.lm_head, ROWS) and "forward" not in vars(model.lm_head)
    assert model.lm_head.weight.requires_grad


def test_a_newer_optimizer_takes_the_rows_over_and_never_trains_them_as_a_candidate():
    model = llama()
    optimizer_for(model, order="descending")
    newer = optimizer_for(model, order="descending")
    assert not any(name.endswith(ROWS) for name in newer.candidates)
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is None and getattr(model.lm_head, ROWS).grad is not None


def test_zero_grad_clears_the_rows_gradient():
    model = llama()
    optimizer = optimizer_for(model, order="descending")
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    rows = getattr(model.lm_head, ROWS)
    optimizer.zero_grad(set_to_none=False)
    assert rows.grad is not None and not rows.grad.any()
    optimizer.zero_grad()
    assert rows.grad is None


def test_under_autocast_the_rows_gradient_is_the_whole_tensors_rows():
    grads = []
    for whole_tensors in (False, True):
        model = llama(whole_tensors=whole_tensors)
        optimizer = optimizer_for(model, order="descending")
        ids = batch(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        (a, b), = optimizer.active_block.row_spans["lm_head.weight"]
        grads.append(getattr(model.lm_head, ROWS).grad if not whole_tensors else model.lm_head.weight.grad[a:b])
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0], grads[1])


def test_tied_custom_and_distributed_weights_keep_the_whole_tensor_path(monkeypatch):
    tied = presets.tiny_llama(vocab_size=VOCAB, hidden=HIDDEN, layers=2, heads=4, kv_heads=2)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert rowgrad.owners(tied, ["model.embed_tokens.weight"]) == {}
    assert rowgrad.owners(llama(whole_tensors=True), ["model.embed_tokens.weight", "lm_head.weight"]) == {}
    monkeypatch.setenv("WORLD_SIZE", "2")  # several ranks: DDP would not average a parameter it did not register
    assert rowgrad.owners(llama(), ["lm_head.weight"]) == {}


@pytest.mark.parametrize("span", [(0, 5), (3, 9), (5, 12)], ids=["padding-inside", "padding-first", "padding-outside"])
def test_an_embeddings_rows_gradient_is_the_whole_gradients_rows_and_skips_padding(span):
    torch.manual_seed(0)
    embedding = nn.Embedding(12, 4, padding_idx=3)
    ids = torch.tensor([[3, 1, 4, 3, 7, 11], [5, 3, 9, 2, 6, 4]])
    grad = torch.randn(2, 6, 4)
    embedding(ids).backward(grad)
    whole = embedding.weight.grad.clone()
    embedding.weight.grad = None
    embedding.weight.requires_grad_(False)
    attached = rowgrad.RowGradient(embedding, span)
    embedding(ids).backward(grad)
    a, b = span
    assert torch.equal(attached.rows.grad, whole[a:b]) and embedding.weight.grad is None
    attached.release()
    assert not hasattr(embedding, ROWS) and "forward" not in vars(embedding)


def test_a_deepcopy_taken_mid_visit_computes_with_its_own_weights():
    # TRL's reference model is a deepcopy of the policy, often taken after the optimizer was built.
    import copy
    import pickle

    model = llama()
    optimizer = optimizer_for(model, order="descending")  # kept: collecting it would give the rows back
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    ids = batch(0)
    assert not twin(input_ids=ids).logits.any() and model(input_ids=ids).logits.any()
    assert pickle.loads(pickle.dumps(model.lm_head)).forward.args[0] is not model.lm_head
    assert hasattr(model.lm_head, ROWS) and not optimizer.closed
