"""The method of the paper in plain PyTorch, with no Lightning in it (SPEC 1-6).

- :mod:`~macsc.method.allocation`: the class prior and the allocation weights (Eq. 4-6).
- :mod:`~macsc.method.losses`: the weighted-aggregation and self-balancing losses (Eq. 7-8, 11-14).
- :mod:`~macsc.method.calibration`: the self-balancing calibration as a module (projectors, ``Z``).
- :mod:`~macsc.method.fusion`: semantic concept enhancement (Eq. 2-3) and pooling.
- :mod:`~macsc.method.network`: backbone + prototype sources + enhancers -> branch representations.
- :mod:`~macsc.method.text_tower`: a multimodal model's text tower as the encoder (SPEC 13).
- :mod:`~macsc.method.heads`: one head class per task kind (Eq. 10-12).
- :mod:`~macsc.method.objective`: ``L = L_wa + λ L_msb`` from the heads' outputs (Eq. 14).
- :mod:`~macsc.method.options`: the options of the enhancement and of the objective, one group
  each (:class:`EnhancerOptions`, :class:`ObjectiveOptions`).

A model without the training machinery: :class:`MaCSCNetwork` gives the branch representations,
a head from :func:`build_task_head` turns them into predictions, and :class:`MaCSCObjective`
into the loss.
"""

from macsc.method.heads import TaskHead, build_task_head
from macsc.method.network import DEFAULT_PROTOTYPES, BranchRepresentations, MaCSCNetwork
from macsc.method.objective import MaCSCObjective
from macsc.method.options import EnhancerOptions, ObjectiveOptions

__all__ = [
    "DEFAULT_PROTOTYPES",
    "BranchRepresentations",
    "EnhancerOptions",
    "MaCSCNetwork",
    "MaCSCObjective",
    "ObjectiveOptions",
    "TaskHead",
    "build_task_head",
]
