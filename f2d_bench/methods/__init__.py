"""Generation methods: the plain-SD reference, imported images, and personalization methods.

Built-ins are listed here by name without importing them; third-party packages add methods through
the entry-point group ``f2d_bench.methods`` (``name = "package.module:Class"``).
"""

from f2d_bench.registry import Registry

METHODS = Registry(
    kind="method",
    group="f2d_bench.methods",
    builtins={
        "sd-class": (
            "f2d_bench.methods.sd_class:SDClassMethod",
            "plain Stable Diffusion with the subject written as the class phrase (text-fidelity reference)",
        ),
        "external": (
            "f2d_bench.methods.external:ExternalMethod",
            "imports images another tool made, laid out as DIR/<face>/<prompt>/<seed>.png",
        ),
        "f2d": (
            "f2d_bench.methods.f2d.method:F2DMethod",
            "Face2Diffusion (CVPR 2024): MSID identity encoder + mapping network, two injected word tokens",
        ),
    },
)
