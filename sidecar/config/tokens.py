"""The ACL token: where it comes from, how it is read, what a usable one looks like. Never printed."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

from .files import TOKEN_MAX_BYTES, FileProblem, read_capped


class TokenError(Exception):
    """The token source cannot give a usable token. The message names the file, never the value."""


@dataclass(frozen=True)
class TokenSource:
    """Where the ACL token comes from. Never printed: ``repr`` hides the value.

    A token file is read again on every request, so a rotated token is used by
    the next request without a restart.
    """

    value: str | None = field(default=None, repr=False)
    file: Path | None = None
    origin: str = ""  # "consul.token", "CONSUL_HTTP_TOKEN_FILE", ... for messages

    def read(self) -> str | None:
        """The token, or None if none is configured. Raises TokenError, whose message never holds the token."""
        if self.file is not None:
            # Capped, regular files only: a token file swapped for a FIFO or /dev/zero must not hang
            # or exhaust the sidecar on its next request.
            try:
                data, _ = read_capped(self.file, TOKEN_MAX_BYTES)
                token = data.decode("utf-8").strip() or None
            except FileProblem as e:
                raise TokenError(f"cannot use the ACL token file: {e}") from None
            except UnicodeDecodeError:
                raise TokenError(f"cannot use the ACL token file {self.file}: not UTF-8") from None
            where = f"the ACL token file {self.file}"
        else:
            token, where = self.value or None, f"the ACL token from {self.origin}"
        # A token goes into an HTTP header: a line break or control character inside it
        # (two tokens pasted into one file) would make every request fail, so it is refused here.
        if token is not None and not token_chars_ok(token):
            raise TokenError(
                f"{where} holds a line break, space, control or non-ASCII character inside the token "
                "(only leading and trailing whitespace is ignored): it must hold exactly one token"
            )
        return token

    def describe(self) -> str | None:
        if self.file is not None:
            return f"file {self.file} (from {self.origin})"
        if self.value:
            return f"<redacted> (from {self.origin})"
        return None


def token_chars_ok(token: str) -> bool:
    return all("!" <= c <= "~" for c in token)


def check_token_file(path: Path) -> tuple[str | None, str | None]:
    """(problem, warning) for a token file as the loader sees it; neither ever holds its content."""
    try:
        data, st = read_capped(path, TOKEN_MAX_BYTES)
    except FileProblem as e:
        return f"token file: {e}", None
    warning = None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        warning = (
            f"token file {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}): whoever "
            "can write it chooses the sidecar's ACL token; chmod 600 it"
        )
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return f"token file {path} is not UTF-8 text", warning
    if not token:
        return f"token file {path} is empty", warning
    if not token_chars_ok(token):
        return (
            f"token file {path}: the token contains a line break, control character, space or non-ASCII character "
            "(two lines in the file?); it goes into an HTTP header"
        ), warning
    return None, warning
