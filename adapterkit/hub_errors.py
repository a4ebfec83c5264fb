"""Hub failures said in one line that tells the user what to do.

``huggingface_hub`` raises exceptions whose text runs over several lines (the request id, the
URL, a hint meant for its own API). Every path that talks to the Hub — pushing and pulling
pocket books (``library.hub``) and downloading a base (``base.resolve``) — explains them here,
so one failure reads the same wherever it happens. It sits at the top level because both
packages use it and ``base`` may not import ``library``.
"""

from __future__ import annotations

import re

#: ``scheme://user:password@`` in a URL: printed, the password would leak into logs
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")


def explain_hub_error(exc: BaseException, repo_id: str, *, revision: str | None = None,
                      writing: bool = False, outcome: str = "nothing was changed") -> str:
    """One line for ``exc``, raised while reading (or, with ``writing``, writing) ``repo_id``.

    :param revision: the branch or commit asked for, named when it does not exist.
    :param writing: a 403 then means no right to write; otherwise no right to read.
    :param outcome: what is true after the failure (``"nothing was imported"``, ``"the repo
        exists but nothing was uploaded to it"``), said where a retry is the advice.

    A ``user:password@`` in ``HF_ENDPOINT`` (or in a URL the exception quotes) is never printed.
    """
    return without_credentials(_explain(exc, repo_id, revision=revision, writing=writing,
                                        outcome=outcome))


def without_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


def _explain(exc: BaseException, repo_id: str, *, revision: str | None, writing: bool,
             outcome: str) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in {repo_id}"
    if isinstance(exc, GatedRepoError):
        return f"{repo_id} is gated: accept its conditions on the Hub first"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"repo {repo_id} does not exist, or it is private and your token cannot see it "
                "(log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        server = getattr(exc, "server_message", None) or _first_line(exc)
        server = " ".join(str(server).split())
        if status == 401:
            return (f"the Hub at {endpoint} refused your credentials; log in with "
                    "`hf auth login` or set HF_TOKEN")
        if status == 403 and writing:
            return (f"no permission to write to {repo_id}: it belongs to another user or "
                    f"organization (server said: {server})")
        if status == 403:
            return (f"no permission to read {repo_id} (server said: {server}); ask its owner "
                    "for access, or log in as a user who has it")
        return f"the Hub at {endpoint} answered {status}: {server}; {outcome}"
    if isinstance(exc, LocalEntryNotFoundError) or is_network_error(exc):
        return (f"cannot reach the Hub at {endpoint} ({type(exc).__name__}); check the "
                f"connection (and HF_ENDPOINT) and retry — {outcome}")
    return f"Hub operation on {repo_id} failed: {type(exc).__name__}: {_first_line(exc)}"


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a connection failure."""
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError",
                         "TimeoutException", "NetworkError", "RemoteProtocolError",
                         "OfflineModeIsEnabled"})


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
