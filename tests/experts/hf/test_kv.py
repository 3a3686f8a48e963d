"""The engine's cache operations: one copy per join or selection, values where the rows expect them."""

import torch

from experts.hf.engine.kv import ROOM, GrowingLayer, joined


def test_joined_right_aligns_each_part_after_zero_padding():
    a = torch.arange(1.0, 7.0).view(2, 1, 3, 1)  # 2 rows, 3 columns
    b = torch.full((1, 1, 1, 1), 9.0)  # 1 row, 1 column
    out = joined([(a, 0), (b, 2)], 0, 2, room=4)
    assert out.shape == (3, 1, 3 + 4, 1)
    assert out[:, 0, :3, 0].tolist() == [[1, 2, 3], [4, 5, 6], [0, 0, 9]]


def test_joined_refuses_parts_whose_widths_differ():
    import pytest

    with pytest.raises(ValueError, match="widths differ"):
        joined([(torch.zeros(1, 1, 3, 1), 0), (torch.zeros(1, 1, 1, 1), 1)], 0, 2, room=0)


def test_growing_layer_selection_keeps_rows_and_room():
    layer = GrowingLayer()
    k = torch.arange(12.0).view(3, 1, 4, 1)
    layer.update(k, -k)
    layer.select_rows(torch.tensor([2, 0]))
    assert layer.keys[:, 0, :, 0].tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert layer.values[:, 0, :, 0].tolist() == [[-8, -9, -10, -11], [-0, -1, -2, -3]]
    room = layer._k.shape[2] - layer.length
    assert 0 < room <= ROOM
    layer.update(torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1))  # a decode step writes into the room
    assert layer.keys.shape == (2, 1, 5, 1) and layer.keys[:, 0, -1, 0].tolist() == [1, 1]
