"""The methods, one file each; importing this package registers every one of them in
:mod:`quicktrain.precond.registry`.

A method file reads as its paper and equations in the docstring and a factory that wires a curvature, a
representation per module type and a solver (or, for Shampoo, PSGD, Newton and CurveBall, its own maker).
"""

from quicktrain.precond.methods import (  # noqa: F401  (each module registers its methods on import)
    curveball,
    ekfac,
    kbfgs,
    kfac,
    kfac_soap,
    newton,
    ng,
    psgd,
    sgd,
    shampoo,
    skfac,
)
