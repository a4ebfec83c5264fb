"""``GET /api/library``: the pocket books of the served base, as the page shows them.

Read from the catalog and each pocket book's metadata at every call, so a pocket book trained
or pulled while the server runs shows up without a restart. Figures are the ones recorded at
training time; none is computed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterkit.errors import PocketBookNotFound
from adapterkit.library.metadata import CONFIG_FILE
from adapterkit.library.store import Library, PocketBook

__all__ = ["library_view", "loss_curve_file"]

#: The loss-curve picture saved with every trained pocket book (see training).
LOSS_CURVE_PNG = "loss_curve.png"


def library_view(library: Library, base: Any, base_id: str) -> dict[str, Any]:
    """``{"base": base_id, "books": [...]}``: the latest version of each pocket book made on
    ``base`` (same fingerprint), with what the page shows of it."""
    books = []
    for summary in library.list(base=base.fingerprint):
        if summary.base_fingerprint != base.fingerprint:
            continue  # a prefix match of another fingerprint: never another base's book
        try:
            book = library.get(f"{summary.name}@{summary.version}")
        except PocketBookNotFound:  # removed between the two reads
            continue
        books.append(_book_entry(book, summary.versions))
    return {"base": base_id, "base_name": base.name, "base_fingerprint": base.fingerprint,
            "books": books}


def _book_entry(book: PocketBook, versions: int) -> dict[str, Any]:
    meta = book.meta
    metrics = dict(meta.metrics)
    png = metrics.pop("loss_curve", None)
    forgetting = (metrics.get("forgetting") or {})
    change = forgetting.get("general_loss_change_pct") if isinstance(forgetting, dict) else None
    return {
        "id": book.ref, "name": meta.name, "version": meta.version, "versions": versions,
        "kind": meta.kind, "base": meta.base.get("name"),
        "base_fingerprint": meta.base_fingerprint, "method": meta.method,
        "rank": _rank(book), "tags": list(meta.tags), "trainer": meta.trainer,
        "created": meta.created, "parents": list(meta.parents), "metrics": metrics,
        # percent change of general-text loss with the pocket book on (null: not measured)
        "forgetting": change,
        "loss_curve": _loss_points(metrics),
        "loss_curve_png": f"/api/library/{book.ref}/loss_curve.png"
        if png and _curve_path(book) is not None else None,
    }


def _rank(book: PocketBook) -> int | None:
    """LoRA rank from the adapter's own config (stacks have none of their own)."""
    if book.meta.kind != "adapter":
        return None
    try:
        config = json.loads((book.path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rank = config.get("r")
    return rank if isinstance(rank, int) else None


def _loss_points(metrics: dict[str, Any]) -> list[list[float]]:
    """``[[step, loss], ...]`` where training recorded the history as numbers; empty where it
    recorded only the picture (``loss_curve_png``)."""
    history = metrics.get("loss_history")
    if not isinstance(history, list):
        return []
    points = []
    for item in history:
        if isinstance(item, (list, tuple)) and len(item) == 2 and \
                all(isinstance(v, (int, float)) for v in item):
            points.append([item[0], item[1]])
        elif isinstance(item, dict) and isinstance(item.get("step"), (int, float)) and \
                isinstance(item.get("loss"), (int, float)):
            points.append([item["step"], item["loss"]])
    return points


def loss_curve_file(library: Library, base: Any, ref: str) -> Path:
    """The loss-curve PNG of pocket book ``ref`` of this base (404 when there is none)."""
    book = library.get(ref)
    path = _curve_path(book)
    if book.meta.base_fingerprint != base.fingerprint or path is None:
        raise PocketBookNotFound(f"{book.ref} has no loss curve on this server's base")
    return path


def _curve_path(book: PocketBook) -> Path | None:
    """The book's own ``loss_curve.png``, a plain file inside its folder — never the path its
    metadata names (a pulled book's metadata could name any file on this machine)."""
    path = book.path / LOSS_CURVE_PNG
    if path.is_symlink() or not path.is_file():
        return None
    return path
