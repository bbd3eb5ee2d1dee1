"""Read a file of bash variable assignments the way ``source`` would, without bash.

Ganeti's Xen NIC file and our own spec files for plain QEMU are
written to be ``source``-d by a shell script: ``TAGS="t1\\ t2"``, ``MAC=aa:...``,
``LINK=``. Running bash on them from a hook would cost a process, and would run
whatever else the file holds, with root privileges. So this module implements
the small part of bash's grammar that such files use, and refuses - rather than
guesses at - anything bash would *execute* or *expand*. A file either means
exactly what it would mean to bash, or it is rejected with the line to fix.

What is understood (each rule checked against bash 5.2 in the unit tests):

* blank lines; ``#`` comments where ``#`` begins a word (``A=1#2`` is the value
  ``1#2``); a backslash at the end of a comment does not continue it;
* ``NAME=value`` words, several per line, optionally after a leading ``export``
  (``export NAME`` alone only marks a variable for export and changes no value);
  later assignments override earlier ones;
* values made of unquoted text (backslash quotes the next character; backslash-
  newline is removed, anywhere outside single quotes and comments), single-quoted
  text (fully literal) and double-quoted text (backslash quotes only ``$``, a
  backtick, ``"``, a backslash and a newline, and is otherwise *kept*: so
  ``TAGS="t1\\ t2"`` is ``t1\\ t2`` with the backslash, as in bash); quotes may span
  lines; a lone backslash at the very end of the file is kept as a character;
* glob characters ``* ? [`` and braces, literally: bash neither globs nor
  brace-expands assignment values.

What is refused with :class:`InvalidInput` naming ``source:line``:

* any word that is not an assignment (bash would run it as a command), including
  ``NAME+=v``, ``NAME[i]=v``, declaration builtins other than ``export``, and a
  name with any quoting in it (``''A=1`` is a command named ``A=1`` to bash);
* ``$`` and backticks outside single quotes, even where bash happens to keep a
  lone ``$`` literally: write ``\\$`` or ``'$'``;
* unquoted ``; & | < > ( )``, unterminated quotes;
* control characters other than tab and newline, anywhere: NUL cannot be in a
  value; a carriage return (a file saved with Windows line endings) would end up
  in the value, which is never what was meant; and bash itself garbles its
  internal quoting bytes ``\\x01`` and ``\\x7f`` in some contexts (``"\\<01><7f>"``
  becomes ``\\<01><01>`` in bash 5.2), so a file holding them has no reliable
  meaning;
* an unquoted ``~`` starting a value or following an unquoted ``:`` in it (bash
  replaces it with a home directory);
* an unquoted ``{`` in an argument of ``export``: unlike a plain assignment, an
  ``export`` argument *is* brace-expanded (``export A=x{1,2}`` sets ``A=x2``).

Bash's dynamic variables (``RANDOM``, ``SECONDS``...) are treated as plain names;
the files we read never assign them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from nichooks.errors import InvalidInput

_BLANKS = frozenset(" \t")
_WORD_END = frozenset(" \t\n")
_OPERATORS = frozenset(";&|<>()")
_EXPANSIONS = frozenset("$`")
_DQ_ESCAPABLE = frozenset('$`"\\')
_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_NAME_CHARS = _NAME_START | frozenset("0123456789")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


class _Word:
    """One shell word: its characters, whether each was quoted, and its line.

    Quoting has to be remembered per character because bash decides after
    lexing whether a word is an assignment (the name and ``=`` must be
    unquoted) and whether a ``~`` is expanded (only an unquoted one).
    """

    __slots__ = ("chars", "first_quote", "line", "lines", "quoted")

    def __init__(self, line: int) -> None:
        self.chars: list[str] = []
        self.quoted: list[bool] = []
        self.lines: list[int] = []
        self.line = line
        # Where the first quote mark was, counted in chars before it: an empty
        # '' or "" adds no character but still stops bash from seeing a name.
        self.first_quote: int | None = None

    def mark_quote(self) -> None:
        if self.first_quote is None:
            self.first_quote = len(self.chars)

    def add(self, char: str, quoted: bool, line: int) -> None:
        self.chars.append(char)
        self.quoted.append(quoted)
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def is_plain(self, literal: str) -> bool:
        """True if the word is exactly ``literal``, unquoted (so a keyword)."""
        return self.text == literal and self.first_quote is None

    def is_plain_name(self) -> bool:
        return self.first_quote is None and _is_name(self.text)

    def assignment(self) -> tuple[str, int] | None:
        """``(name, index of the value's first char)`` if bash would treat the
        word as an assignment, else None."""
        for i, (char, quoted) in enumerate(zip(self.chars, self.quoted, strict=True)):
            if quoted or (self.first_quote is not None and self.first_quote <= i):
                return None
            if char == "=":
                name = "".join(self.chars[:i])
                return (name, i + 1) if _is_name(name) else None
            if char not in _NAME_CHARS:
                return None
        return None


def _is_name(text: str) -> bool:
    return bool(text) and text[0] in _NAME_START and set(text) <= _NAME_CHARS


def _show(text: str) -> str:
    """A word for an error message: quoted, control characters escaped, short."""
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


class _Lexer:
    """Splits the text into commands (lists of words), refusing what bash
    would execute or expand at the point where it is met."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1

    def error(self, line: int, problem: str) -> InvalidInput:
        return InvalidInput(f"{self.source}:{line}", problem)

    def commands(self) -> Iterator[list[_Word]]:
        text = self.text
        words: list[_Word] = []
        while self.pos < len(text):
            char = text[self.pos]
            if char in _BLANKS:
                self.pos += 1
            elif char == "\\" and text.startswith("\n", self.pos + 1):
                self.pos += 2  # line continuation between words
                self.line += 1
            elif char == "\n":
                self.pos += 1
                self.line += 1
                if words:
                    yield words
                    words = []
            elif char == "#":  # a comment starts only where a word would
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                words.append(self.word())
        if words:
            yield words

    def word(self) -> _Word:
        text = self.text
        word = _Word(self.line)
        while self.pos < len(text):
            char = text[self.pos]
            if char in _WORD_END:
                break
            if char in _OPERATORS:
                raise self.error(
                    self.line,
                    f"unquoted {char!r}: bash would treat it as an operator (quote the value)",
                )
            if char in _EXPANSIONS:
                raise self._expansion(char)
            if char == "\\":
                following = text[self.pos + 1 : self.pos + 2]
                if following == "\n":
                    self.pos += 2
                    self.line += 1
                elif following == "":
                    word.mark_quote()
                    word.add("\\", True, self.line)  # bash keeps it at end of file
                    self.pos += 1
                else:
                    word.mark_quote()
                    word.add(following, True, self.line)
                    self.pos += 2
            elif char == "'":
                self.single_quoted(word)
            elif char == '"':
                self.double_quoted(word)
            else:
                word.add(char, False, self.line)
                self.pos += 1
        return word

    def single_quoted(self, word: _Word) -> None:
        start_line = self.line
        word.mark_quote()
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise self.error(start_line, "unterminated single quote")
        for char in self.text[self.pos + 1 : end]:
            word.add(char, True, self.line)
            if char == "\n":
                self.line += 1
        self.pos = end + 1

    def double_quoted(self, word: _Word) -> None:
        text = self.text
        start_line = self.line
        word.mark_quote()
        self.pos += 1
        while True:
            if self.pos >= len(text):
                raise self.error(start_line, "unterminated double quote")
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return
            if char in _EXPANSIONS:
                raise self._expansion(char)
            if char == "\\":
                following = text[self.pos + 1 : self.pos + 2]
                if following == "\n":
                    self.pos += 2
                    self.line += 1
                    continue
                if following and following in _DQ_ESCAPABLE:
                    word.add(following, True, self.line)
                    self.pos += 2
                    continue
                # any other backslash stays in the value, as in bash
            word.add(char, True, self.line)
            self.pos += 1
            if char == "\n":
                self.line += 1

    def _expansion(self, char: str) -> InvalidInput:
        what = "command substitution" if char == "`" else "expansion"
        return self.error(
            self.line,
            f"unquoted {char!r}: bash would perform {what} (write \\{char} or put it in single quotes)",
        )


def parse_assignments(text: str, source: str) -> dict[str, str]:
    """The variables that ``source``-ing ``text`` in bash would set.

    ``source`` names the file in error messages (``source:line``). Raises
    :class:`InvalidInput` for anything bash would run or expand, so that a
    result is never a guess at what the file meant.
    """
    control = _CONTROL.search(text)
    if control is not None:
        line = text.count("\n", 0, control.start()) + 1
        raise InvalidInput(f"{source}:{line}", _control_problem(control.group()))

    lexer = _Lexer(text, source)
    result: dict[str, str] = {}
    for words in lexer.commands():
        is_export = words[0].is_plain("export")
        if is_export:
            if len(words) == 1:
                raise lexer.error(words[0].line, "'export' without an assignment")
            words = words[1:]
        for word in words:
            if is_export and any(c == "{" and not q for c, q in zip(word.chars, word.quoted, strict=True)):
                raise lexer.error(
                    word.line,
                    f"unquoted '{{' in {_show(word.text)}: bash brace-expands "
                    "arguments of 'export' (quote it)",
                )
            found = word.assignment()
            if found is None:
                if is_export and word.is_plain_name():
                    continue  # only marks the variable for export
                raise lexer.error(word.line, _not_assignment(word))
            name, start = found
            _check_tildes(word, start, lexer)
            result[name] = "".join(word.chars[start:])
    return result


def _control_problem(char: str) -> str:
    if char == "\0":
        return "NUL byte (not a text file?)"
    if char == "\r":
        return "carriage return (Windows line endings?): bash would keep it in the value"
    return f"control character U+{ord(char):04X}: bash mishandles some of them (\\x01, \\x7f)"


def _not_assignment(word: _Word) -> str:
    text = word.text
    if "=" in text and word.first_quote is None:
        name = text.partition("=")[0]
        if name.endswith("+") or "[" in name:
            return f"{_show(text)}: only plain NAME=value assignments are supported"
        return f"{_show(text)}: {_show(name)} is not a valid variable name"
    return f"{_show(text)} is not an assignment: bash would run it as a command"


def _check_tildes(word: _Word, start: int, lexer: _Lexer) -> None:
    """Refuse the tildes bash expands in an assignment: unquoted, at the start
    of the value or right after an unquoted ``:``."""
    for i in range(start, len(word.chars)):
        if word.chars[i] != "~" or word.quoted[i]:
            continue
        if i == start or (word.chars[i - 1] == ":" and not word.quoted[i - 1]):
            raise lexer.error(
                word.lines[i],
                "unquoted '~' would be replaced by a home directory (write \\~ or quote it)",
            )


MAX_FILE = 64 * 1024
"""A NIC file or spec file is a dozen short lines; anything much longer is not one."""


def read_assignments(path: Path, source: str | None = None) -> dict[str, str] | None:
    """Parse the file at ``path`` like :func:`parse_assignments`; None if it does not
    exist. Only a regular file of at most MAX_FILE bytes, valid UTF-8, is read: it is
    opened non-blocking (a FIFO left where the file should be would otherwise hang
    the hook, and the hypervisor waiting for it) and checked with fstat before any
    read. Anything else raises :class:`InvalidInput` naming the file."""
    from nichooks.safefile import NotReadable, read_regular

    name = source or str(path)
    try:
        data = read_regular(path, MAX_FILE)
    except NotReadable as exc:
        raise InvalidInput(name, f"{exc}: not a NIC description") from None
    except OSError as exc:
        raise InvalidInput(name, f"cannot be read: {exc.strerror or exc}") from None
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(name, f"is not UTF-8 text (byte {exc.start})") from None
    return parse_assignments(text, name)
