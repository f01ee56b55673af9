"""CP communication type: chosen or refused by name before compute (transformer-engine's limits)."""

import pytest
import torch

from ttt_train.runtime.cp_attention_rules import check_thd_padding, resolve_cp_comm_type
from ttt_train.runtime.distributed import ParallelConfig


def resolve(requested="auto", *, cp=2, tp=1, backend="te", window=None, heads=16, groups=8):
    return resolve_cp_comm_type(requested, cp=cp, tp=tp, backend=backend, sliding_window=window,
                                num_attention_heads=heads, num_query_groups=groups)


def test_auto_choices():
    assert resolve(cp=1) is None
    assert resolve() == "p2p"
    assert resolve(window=4096) == "a2a"
    assert resolve(window=4096, groups=1) == "all_gather"  # one KV group does not split over 2 CP ranks
    assert resolve(window=4096, tp=4, heads=16, groups=4) == "all_gather"  # 1 group per TP rank
    assert resolve(backend="local") == "all_gather"
    assert resolve("a2a", window=4096) == "a2a"
    assert resolve("all_gather", window=4096) == "all_gather"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(requested="p2p", window=4096), r"parallel\.cp_comm_type=p2p: .*sliding window.*a2a or all_gather.*=a2a"),
    (dict(requested="p2p", window=4096, groups=1), r"parallel\.cp_comm_type=p2p: .*set parallel\.cp_comm_type=all_gather"),
    (dict(requested="a2a", groups=1), r"parallel\.cp_comm_type=a2a: .*do not divide by parallel\.cp=2"),
    (dict(requested="a2a+p2p"), r"parallel\.cp_comm_type=a2a\+p2p: .*hierarchical"),
    (dict(requested="p2p", backend="local"), r"parallel\.cp_comm_type=p2p: model\.backend=local .*all_gather"),
    (dict(requested="ring"), r"parallel\.cp_comm_type='ring': use one of"),
])
def test_refused_by_name(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve(**kwargs)


def test_key_is_part_of_parallel_config():
    assert ParallelConfig.from_dict({"cp": 2, "cp_comm_type": "a2a"}).cp_comm_type == "a2a"
    with pytest.raises(ValueError, match="parallel.cp_comm_type"):
        ParallelConfig.from_dict({"cp_comm_type": "ring"})


def test_thd_padding():
    check_thd_padding(torch.tensor([[0, 8, 24]]), cp=2)  # megatron's [1, n + 1] layout, multiples of 4
    check_thd_padding([0, 5, 7], cp=1)
    with pytest.raises(ValueError, match=r"lengths \[6\] are not multiples of 2 \* cp = 4.*pad each sequence"):
        check_thd_padding([0, 8, 14], cp=2)

