"""Kronecker SGD (Song & Yue, arXiv 2305.08001): SGD with per-step cost independent of d.

Inputs are Kronecker products ``x = torch.kron(u, v)`` (first factor slowest; with the
column-major vec, ``(A⊗B) vec(V) = vec(B V Aᵀ)`` and ``⟨w, u⊗v⟩ = uᵀ w.reshape(d1, d2) v``).
The two-layer shifted-ReLU network ``f(x) = m^{-1/2} Σ_r a_r max(⟨w_r, x⟩ − b, 0)`` is
trained by :class:`KronSGD`, which keeps the pre-activations ``Z`` in an activated-neuron
search (default: a column scan or block bounds, chosen by :func:`choose_path`; the paper's
:class:`AsynchronousTree` on request) and moves them through the Gram matrix;
:class:`DenseSGD` is the explicit-``x`` reference. :meth:`KronSGD.from_weights` starts from
given ``W(0)`` and ``a``; from a seed, ``Z(0)`` is drawn from its law ``N(0, G)`` without drawing
``W(0)`` where that is cheaper and exact (:class:`ConditionalInit`, :func:`choose_draw`).
"""

from ._math import gram_matrix, kron_rows, preactivations, shifted_relu, squared_loss, update_coefficients
from .data import KronDataset, batch_schedule, make_digit_pairs, make_fashion_pairs, make_teacher
from .dense import DenseSGD, StepResult
from .model import ConditionalInit, ExplicitInit, KronMLP, SeededInit
from .search import PATHS, BlockSearch, ScanSearch, TreeSearch, choose_path
from .sgd import DRAWS, KronSGD, choose_draw, draw_seeded, initial_preactivations
from .tree import AsynchronousTree

__all__ = [
    # model
    "KronMLP",
    "SeededInit",
    "ConditionalInit",
    "ExplicitInit",
    # trainers
    "DenseSGD",
    "KronSGD",
    "StepResult",
    "initial_preactivations",
    "DRAWS",
    "choose_draw",
    "draw_seeded",
    # activated-neuron search
    "PATHS",
    "choose_path",
    "ScanSearch",
    "BlockSearch",
    "TreeSearch",
    "AsynchronousTree",
    # data
    "KronDataset",
    "batch_schedule",
    "make_digit_pairs",
    "make_fashion_pairs",
    "make_teacher",
    # equations
    "gram_matrix",
    "kron_rows",
    "preactivations",
    "shifted_relu",
    "squared_loss",
    "update_coefficients",
]
