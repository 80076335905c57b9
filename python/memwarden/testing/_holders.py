"""Who holds a leaked object: names like ``mod.CACHE['k']``, ``mod.Holder.buf`` or
``local x of f()``, found by a bounded walk up ``gc.get_referrers``."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from types import FrameType
from typing import Any, Iterator

__all__ = ["describe_holders"]

_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


@contextlib.contextmanager
def _frozen_objects_visible() -> Iterator[None]:
    """gc.get_referrers() does not see objects that gc.freeze() moved away (the plugin
    freezes what was alive before the first checked test: modules, their dicts and caches);
    they come back for the search and everything alive is frozen again after it."""
    frozen = hasattr(gc, "freeze") and gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    try:
        yield
    finally:
        if frozen:
            gc.freeze()


def describe_holders(objs: list, limit: int = 3, depth: int = 6, width: int = 256) -> list[list[str]]:
    """For each object of ``objs`` (None: skipped), up to ``limit`` names of what keeps it
    alive, e.g. ``mod.CACHE['k']``, ``mod.Holder.buf``, ``mod.ROOT.children[0].buf``,
    ``local x of f()``, or ``<Node object>.buf`` when no module global or frame leads to it.

    A breadth-first walk up ``gc.get_referrers`` from all the objects at once: one scan of
    the heap per level, at most ``depth`` levels and ``width`` holders per level; a path ends
    at a module's globals or a frame, and never visits an object twice (reference cycles).
    """
    roots = {id(d): name for name, m in list(sys.modules.items())
             if type(d := getattr(m, "__dict__", None)) is dict and not name.startswith("__mp_")}
    found: list[list[str]] = [[] for _ in objs]
    loose: list[tuple] = [() for _ in objs]       # per object, the longest path without a root
    seen = [{id(o)} for o in objs]
    frontier = [(i, (o,)) for i, o in enumerate(objs) if o is not None]
    ours = {id(objs), *(id(c) for _, c in frontier)}    # our own containers are no holders
    with _frozen_objects_visible():
        for _ in range(depth):
            if not frontier:
                break
            targets = [chain[-1] for _, chain in frontier]
            ours.add(id(targets))
            waiting: dict[int, list] = {}
            for node in frontier:
                waiting.setdefault(id(node[1][-1]), []).append(node)
            nxt: list = []
            for r in gc.get_referrers(*targets):
                if id(r) in ours or (type(r) is FrameType and r.f_code.co_filename.startswith(_HERE)):
                    continue
                for child in gc.get_referents(r):
                    for i, chain in waiting.get(id(child), ()):
                        if len(found[i]) >= limit or id(r) in seen[i]:
                            continue
                        seen[i].add(id(r))
                        if id(r) in roots or type(r) is FrameType:
                            found[i].append(_render(chain + (r,), roots))
                        elif len(nxt) < width:
                            nxt.append((i, chain + (r,)))
                            ours.add(id(nxt[-1][1]))
                            loose[i] = nxt[-1][1]
            del targets, waiting
            frontier = nxt
        del frontier
        return [f or ([_render(lz, roots)] if lz else []) for f, lz in zip(found, loose)]


def _render(chain: tuple, roots: dict[int, str]) -> str:
    """``chain`` runs from the held object up to its outermost holder found."""
    top = chain[-1]
    i = len(chain) - 1
    if id(top) in roots:
        head, i = roots[id(top)] + _key(top, chain[-2], "."), i - 1
    elif type(top) is FrameType:
        name = next((k for k, v in top.f_locals.items() if v is chain[-2]), "?")
        head, i = f"local {name} of {top.f_code.co_name}()", i - 1
    elif isinstance(top, type):
        head = top.__qualname__
    else:
        head = f"<{type(top).__name__} object>"
    parts = [head]
    while i > 0:
        parent, child = chain[i], chain[i - 1]
        if i > 1 and type(child) is dict and _is_attr_dict(parent, child):   # obj.__dict__[k]: obj.k
            parts.append(_key(child, chain[i - 2], "."))
            i -= 2
            continue
        parts.append(_key(parent, child, "[]"))
        i -= 1
    return "".join(parts)


def _is_attr_dict(owner: Any, d: dict) -> bool:
    if isinstance(owner, type):
        return d.keys() == owner.__dict__.keys()
    try:
        return object.__getattribute__(owner, "__dict__") is d
    except AttributeError:
        return False


_REFS = ("__closure__", "cell_contents", "__self__", "__func__", "__defaults__", "__kwdefaults__",
         "__wrapped__", "__traceback__", "tb_frame", "__cause__", "__context__")


def _key(parent: Any, child: Any, style: str) -> str:
    """How ``parent`` refers to ``child``: ``[key]`` (``.key`` when ``style`` is "." and
    the key a string: module and attribute dicts), ``[i]``, ``.attribute``."""
    if isinstance(parent, dict):
        for k, v in parent.items():
            if v is child:
                return f".{k}" if style == "." and isinstance(k, str) else f"[{_short(k)}]"
        return "[<a key>]"
    if isinstance(parent, (list, tuple)):
        return next((f"[{j}]" for j, v in enumerate(parent) if v is child), "[?]")
    if isinstance(parent, (set, frozenset)):
        return "{<an element>}"
    try:
        attrs = dict(vars(parent)) if hasattr(parent, "__dict__") else {}
        for cls in type(parent).__mro__:
            slots = getattr(cls, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                attrs.setdefault(slot, getattr(parent, slot, None))
        for k in _REFS:
            attrs.setdefault(k, getattr(parent, k, None))
        for k, v in attrs.items():
            if v is child:
                return f".{k}"
    except Exception:  # noqa: BLE001 - a name is best effort
        pass
    return f"-><{type(child).__name__}>"


def _short(key: Any) -> str:
    r = repr(key)
    return r if len(r) <= 40 else r[:37] + "..."
