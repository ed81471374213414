"""One copy of the weights (relaygen_sgl/servers/cpu/weights.py): servers that load the same
bytes map one file, with their values unchanged and tied weights still tied."""

from __future__ import annotations

import torch

from relaygen_sgl.servers.cpu.weights import PREFIX, share


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=True))
    m[1].weight = m[0].weight  # tied, as SmolLM2's output map is its embedding
    return m


def test_two_servers_with_the_same_weights_map_one_file(tmp_path):
    a, b, other = _model(0), _model(0), _model(1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    x = torch.tensor([[1, 2, 3]])
    want = a(x)
    pa, pb = share(a, tmp_path), share(b, tmp_path)
    assert pa == pb and pa.name.startswith(PREFIX)
    assert sorted(p.name for p in tmp_path.iterdir()) == [pa.name]  # no temporary file left
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])
    assert a[1].weight is a[0].weight  # still tied
    assert torch.equal(a(x), want) and torch.equal(b(x), want)
    # both models' parameters live in the file's pages: a write through the map shows in the other
    with torch.no_grad():
        a[1].bias[0] = 42.0
    assert b[1].bias[0].item() == 42.0
    assert share(other, tmp_path) != pa  # other bytes, another file
