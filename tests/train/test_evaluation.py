"""The CPU evaluation pass runs in cache-sized chunks and scores exactly what whole batches score."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.models.mnist import MnistGapNet
from toolkit.train import loop


def test_chunks_are_sized_by_the_largest_activation():
    # fine4's largest map: 12 x 28 x 28 float32 = 37,632 bytes per image
    assert loop.cache_sized_chunk(MnistGapNet().eval(), torch.zeros(1, 1, 28, 28)) == loop.EVAL_CHUNK_BYTES // 37_632
    wide = nn.Sequential(nn.Conv2d(3, 2048, 3, padding=1))  # 8 MB per 32x32 image: one at a time
    assert loop.cache_sized_chunk(wide, torch.zeros(1, 3, 32, 32)) == 1


def test_chunked_evaluation_scores_what_whole_batches_score(monkeypatch):
    torch.manual_seed(0)
    model = MnistGapNet()
    with torch.no_grad():  # a model with real statistics, not the initial ones
        model.train()
        model(torch.randn(256, 1, 28, 28))
    x, y = torch.randn(700, 1, 28, 28), torch.randint(0, 10, (700,))
    loader = [(x[i:i + 300], y[i:i + 300]) for i in range(0, 700, 300)]
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "EVAL_CHUNK_BYTES", 37_632 * 64)  # 64-image chunks: 5 per 300-image batch
    calls = []
    handle = model.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    chunked = loop.evaluate(model, loader, cpu)
    assert max(calls) == 64 and sum(calls) == 1 + 700  # one image sizes the chunks, then every image once
    monkeypatch.setattr(loop, "EVAL_CHUNK_BYTES", 1 << 62)
    whole = loop.evaluate(model, loader, cpu)
    handle.remove()
    assert torch.equal(chunked[2], whole[2]) and torch.equal(chunked[3], whole[3])
    assert chunked[1] == whole[1] and abs(chunked[0] - whole[0]) < 1e-5
