"""Attention methods behind one signature: forward(q, k, v, mask) -> out.

q, k, v: [B, H, n, d]; mask: [B, n] with 1 for real tokens and 0 for padding (or None).
Padded keys get no weight; padded queries output zeros. Each method lives in one module of this
package and registers itself with `@register("<name>")`; importing the package imports every
module in it, so adding a method means adding one file (and its config in conf/attn/).
"""

import importlib
import pkgutil

from mra_lra.attention.registry import build, get, names, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["build", "get", "names", "register"]
