"""parse_assignments against the real thing: every accepted sample is also sourced
by bash, and both must agree on every variable and value.

Bash only ever runs in a sandbox where no command can run (run_bash): a restricted
shell (no output redirection, no `cd`, `exec` or command names with a slash), with
PATH naming a directory that does not exist (an empty PATH would mean the current
directory to bash), in a fresh directory, as nobody when the tests run as root (so
it cannot write there either), and with every builtin but the few the harness needs
replaced by a function that reports it ran. Bait executables named like commands sit in that
directory, on no PATH: one that ran would leave a mark. Afterwards the directory
must be exactly as it was, and no mark there. So the samples may hold `$`,
backticks, operators and commands: a file wrongly accepted shows up as a command
reported, not as a command run.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nichooks.callers.shellvars import parse_assignments
from nichooks.errors import InvalidInput

BASH = shutil.which("bash") or "/bin/bash"

# Files the glob samples would match if bash globbed assignment values.
GLOB_BAIT = ("A=x", "E=zz", "G=abc", "G=a[b]", "abc", "x1")
# Executables named like what a wrongly accepted sample could run; on no PATH.
BAIT_COMMANDS = ("x", "a", "A", "B", "c", "d", "f", "id", "touch", "rm", "reboot", "sh", "true", "env")
# The builtins left as they are: what the harness itself runs, and `export`, which
# is part of the accepted grammar. Every other one reports that it ran.
KEPT_BUILTINS = frozenset({"source", ".", "printf", "compgen", "export"})
RAN = "__nichooks_ran__"
DUMP = b"\0nichooks-dump\0"
HOME = "/home-of-bash"  # what bash would put for an unquoted ~
# Bash refuses these to a restricted shell; a sample that assigns one, or one of the
# variables bash sets itself (bash_own_names), cannot be compared.
RESTRICTED_NAMES = frozenset({"SHELL", "PATH", "ENV", "BASH_ENV", "HISTFILE"})
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


@functools.cache
def builtins() -> tuple[str, ...]:
    proc = subprocess.run([BASH, "--norc", "--noprofile", "-c", "compgen -b"], env={},
                          capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    names = tuple(proc.stdout.split())
    assert {"eval", "kill", "history", "cd", "true"} <= set(names), names
    return names


@dataclass(frozen=True)
class BashRun:
    variables: dict[str, str]  # every variable set after sourcing, bash's own included
    ran: list[str]             # commands run or tried, in order (builtins, not found)
    stderr: str
    printed: bytes             # what the sample itself wrote to stdout
    status: str                # the exit status of `source`
    marks: list[str]           # bait executables that ran
    changed: list[str]         # entries of the sandbox added, removed or altered

    @property
    def file_variables(self) -> dict[str, str]:
        """The variables set by the sample, not by bash itself."""
        own = bash_own_names()
        return {k: v for k, v in self.variables.items() if k not in own}

    def assert_contained(self) -> None:
        assert self.marks == [], f"bait ran: {self.marks}"
        assert self.changed == [], f"the sandbox directory changed: {self.changed}"


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            found[str(path.relative_to(root))] = (st_.st_mode, st_.st_uid, data)
    return found


def _script(name: str) -> str:
    overrides = "".join(f'function {b} {{ {RAN}"$FUNCNAME"; }}\n'
                        for b in builtins() if b not in KEPT_BUILTINS)
    return (overrides
            + f"source {name}\n"
            + "__nichooks_status=$?\n"
            + "printf '\\0nichooks-dump\\0%s\\0' \"$__nichooks_status\"\n"
            + "for __nichooks_name in $(compgen -v); do\n"
            + '  [[ -v $__nichooks_name ]] && printf \'%s=%s\\0\' "$__nichooks_name" "${!__nichooks_name}"\n'
            + "done\n")


def run_bash(content: str | bytes, path_variable: str | None = None) -> BashRun:
    """Source ``content`` in the sandbox described above; ``path_variable`` replaces
    the PATH that names nothing (only to prove that the bait works)."""
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogateescape")
    as_root = os.geteuid() == 0
    sandbox = Path(tempfile.mkdtemp(prefix="nichooks-bash-"))
    try:
        os.chmod(sandbox, 0o755)  # readable by nobody, writable by no one but us
        marks = sandbox / "marks"
        marks.mkdir()
        os.chmod(marks, 0o777)  # only a bait executable writes here
        for bait in BAIT_COMMANDS:
            script = sandbox / bait
            script.write_text(f"#!/bin/sh\n: > '{marks}/{bait}'\n")
            os.chmod(script, 0o755)
        for name in GLOB_BAIT:
            (sandbox / name).touch()
        name = f"sample-{secrets.token_hex(6)}"  # no sample can name it to source it again
        (sandbox / name).write_bytes(content)
        os.chmod(sandbox / name, 0o644)
        before = _snapshot(sandbox)
        as_nobody: dict[str, Any] = {}
        if as_root:
            nobody = pwd.getpwnam("nobody")
            as_nobody = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        proc = subprocess.run(
            [BASH, "--norc", "--noprofile", "-r", "-c", _script(name)],
            env={"PATH": path_variable if path_variable is not None else str(sandbox / "no-commands"),
                 "HOME": HOME},
            cwd=sandbox, stdin=subprocess.DEVNULL, capture_output=True, check=False,
            timeout=120,  # a hang guard only: a sample that loops must not block the suite
            **as_nobody,
        )
        after = _snapshot(sandbox)
        found_marks = sorted(os.listdir(marks))
    finally:
        shutil.rmtree(sandbox)
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and not k.startswith("marks/"))
    printed, mark, dump = proc.stdout.partition(DUMP)
    assert mark, f"bash stopped before the dump: {proc.stderr.decode(errors='replace')}"
    status, *items = dump.split(b"\0")
    variables = {}
    for item in items:
        if item:
            key, _, value = item.partition(b"=")
            variables[os.fsdecode(key)] = os.fsdecode(value)
    stderr = proc.stderr.decode(errors="replace")
    ran = [name.removeprefix(RAN)
           for name in re.findall(r"line \d+: (.*): command not found$", stderr, re.MULTILINE)]
    return BashRun(variables=variables, ran=ran, stderr=stderr, printed=printed,
                   status=status.decode(), marks=found_marks, changed=changed)


@functools.cache
def bash_own_names() -> frozenset[str]:
    return frozenset(run_bash(b"").variables) | RESTRICTED_NAMES


def bash_source(content: str | bytes) -> dict[str, str]:
    """The variables sourcing ``content`` sets, having checked that bash ran nothing,
    printed nothing and reported no error."""
    run = run_bash(content)
    run.assert_contained()
    assert (run.ran, run.printed, run.stderr, run.status) == ([], b"", "", "0"), "bash did more than assign"
    return run.file_variables


def both(text: str) -> tuple[dict[str, str], dict[str, str]]:
    return parse_assignments(text, "nicfile"), bash_source(text)


# The file Ganeti writes for a Xen NIC (hv_xen.py _WriteNICInfoFile), in its order.
GANETI_XEN_NIC = """\
TAGS="web\\ prod\\ zone:a"
NETWORK_NAME="net1"
NETWORK_UUID="3f1c0b7e-8f6a-4b8e-9a57-3d3c9e2a1b10"
NETWORK_TAGS="blue green"
NETWORK_SUBNET="192.0.2.0/24"
NETWORK_GATEWAY="192.0.2.1"
NETWORK_SUBNET6="2001:db8::/64"
NETWORK_GATEWAY6="2001:db8::1"
NETWORK_MAC_PREFIX="aa:00:01"
MAC=aa:00:00:11:22:33
IP=192.0.2.10
INTERFACE_INDEX=0
INTERFACE_NAME=eth-front
INTERFACE_UUID=6a4e7f02-2c1d-4a43-8f6e-0e5c7d9b2a31
MODE=bridged
LINK=
VLAN=
"""

ACCEPTED = {
    "ganeti_xen_nic": GANETI_XEN_NIC,
    "ganeti_xen_nic_ovs": 'TAGS=""\nMAC=aa:00:00:00:00:01\nINTERFACE_INDEX=3\n'
    "INTERFACE_UUID=u\nMODE=openvswitch\nLINK=br-int\nVLAN=.100:200:300\n",
    "empty_file": "",
    "only_comments": "# nothing\n   # indented\n\n\t\n",
    "no_final_newline": "A=1",
    "empty_values": "A=\nB=''\nC=\"\"\nD=''\"\"''\n",
    "equals_in_value": "A=a=b=c\nB==\nC='x=y'\n",
    "several_per_line": "A=1 B=2\tC=3   D=4\n",
    "override": "A=1\nA=2 A=3\nB=x\n",
    "export_prefix": "export A=1\nexport B=2 C=3\nexport\tD='x y'\n",
    "export_existing_name": "A=1\nexport A\nexport A B=2\n",
    "concatenation": 'A="x"\'y\'z\\ w""\nB=a\'b c\'"d e"f\n',
    "backslash_unquoted": "A=a\\ b\\\\c\\'d\\\"e\\$f\\`g\\#h\\;i\\&j\\|k\\<l\\(m\\~n\\x\n",
    "backslash_in_double_quotes": 'A="t1\\ t2"\nB="a\\$b\\`c\\"d\\\\e\\nf\\q"\nC="\\\'"\n',
    "single_quotes_literal": "A='$HOME `id` \\ \\\\ \" ~ ; & | < > ( ) * ? [ {a,b}'\n",
    "escaped_single_quote": "A='it'\\''s'\n",
    "multiline_double": 'A="line1\nline2\n  line3"\nB=after\n',
    "multiline_single": "A='one\n\ntwo\\\nthree'\nB=2\n",
    "continuation_unquoted": "A=abc\\\ndef\nB=1 \\\n C=2\n\\\nD=3\n",
    "continuation_in_double": 'A="abc\\\ndef"\n',
    "continuation_in_name": "AB\\\nC=1\n",
    "continuation_after_export": "export \\\nA=1\n",
    "comment_ends_at_newline": "# a comment \\\nA=1\n",
    "hash_inside_word": "A=1#2\nB=#x\nC='#'\nD=x #comment\nE= #empty\n",
    "trailing_comment": "A=1 B=2 # C=3\n",
    "unicode": "A=ünïcødé\nB='日本語 テキスト'\nC=\"emoji 🎉\"\nD=Ωmega\n",
    "tabs_quoted": "A='\t'\nB=\"tab\there\"\nC=\\\t\n",
    "c1_and_other_unicode_controls": "A='\x85\u2028\u200b'\n",
    "globs_are_literal": "A=*\nB=a?c\nC=[ab]\nD=x*\nexport E=* G=a?c\nH=a[b]\n",
    "braces_literal_in_assignment": "A={a,b}\nB=x{1..3}\nC={}\nD=}\nE={\n",
    "quoted_brace_after_export": "export A='{a,b}' B=x\\{1,2}\n",
    "tilde_not_expanded": 'A=x~y\nB=a=~\nC=\'~\'\nD=\\~\nE="~"\nF="x:"~\nG=x\\:~\n',
    "bang_and_percent": "A=!x\nB=%s\nC=@\nD=a,b\nE=^x\n",
    "dollar_escaped": "A=\\$HOME\nB=\"\\$HOME\"\nC='$HOME'\n",
    "trailing_backslash_at_eof": "A=x\\",
    "tabs_and_indent": "\t A=1\t\n  B=2  \n",
    "names": "_a=2\nA_9=3\nlower=4\nMiXeD_1=5\n",
    "spec_file": "# nichooks spec for tap7\nINSTANCE=vm1.example.com\nMAC=52:54:00:12:34:56\n"
    "MODE=routed\nLINK=100\nIP=2001:db8::7\nVLAN=\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_agrees_with_bash(name: str) -> None:
    ours, bash = both(ACCEPTED[name])
    assert ours == bash


def test_ganeti_xen_nic_values() -> None:
    env = parse_assignments(GANETI_XEN_NIC, "/var/run/ganeti/xen-hypervisor/nic/i1/0")
    assert env["TAGS"] == "web\\ prod\\ zone:a"  # bash keeps the backslashes
    assert env["LINK"] == "" and env["VLAN"] == ""
    assert env["NETWORK_TAGS"] == "blue green"
    assert env["MAC"] == "aa:00:00:11:22:33"


def test_assignment_order_is_kept() -> None:
    assert list(parse_assignments("B=1\nA=2\nB=3\n", "f")) == ["B", "A"]


# (text, line of the problem, words expected in the message)
REFUSED = [
    ("echo hi\n", 1, "command"),
    ("A=1\nrm -rf /\n", 2, "command"),
    ("A=1 echo\n", 1, "command"),
    ("A=1 export B=2\n", 1, "command"),
    ("declare A=1\n", 1, "command"),
    ("readonly A=1\n", 1, "command"),
    ('"A"=1\n', 1, "command"),
    ("\\A=1\n", 1, "command"),
    ("A\\=1\n", 1, "command"),
    ("A'='1\n", 1, "command"),
    ("1A=2\n", 1, "not a valid variable name"),
    ("é=1\n", 1, "not a valid variable name"),
    ("=1\n", 1, "not a valid variable name"),
    ("A+=1\n", 1, "only plain"),
    ("A[0]=1\n", 1, "only plain"),
    ("export\n", 1, "export"),
    ("export -n A=1\n", 1, "command"),
    ("export A=1 -p\n", 1, "command"),
    ("{\n", 1, "command"),
    ("!\n", 1, "command"),
    ("A=$HOME\n", 1, "expansion"),
    ("A=$\n", 1, "expansion"),
    ("A=${X}\n", 1, "expansion"),
    ("A=$(id)\n", 1, "expansion"),
    ("A=$((1+1))\n", 1, "expansion"),
    ("A=$'x'\n", 1, "expansion"),
    ('A=$"x"\n', 1, "expansion"),
    ('A="$HOME"\n', 1, "expansion"),
    ('A="a\nb$c"\n', 2, "expansion"),
    ("A=`id`\n", 1, "command substitution"),
    ('A="`id`"\n', 1, "command substitution"),
    ("A=1;B=2\n", 1, "operator"),
    ("A=1 ;\n", 1, "operator"),
    ("A=1&\n", 1, "operator"),
    ("A=1 && B=2\n", 1, "operator"),
    ("A=1|x\n", 1, "operator"),
    ("A=<x\n", 1, "operator"),
    ("A=x>y\n", 1, "operator"),
    ("A=(1 2)\n", 1, "operator"),
    ("A=<(id)\n", 1, "operator"),
    ("A=1\n(B=2)\n", 2, "operator"),
    ("A='x\nB=1\n", 1, "unterminated single quote"),
    ('A=1\nB="x\nC=1\n', 2, "unterminated double quote"),
    ('A="x\\"\n', 1, "unterminated double quote"),
    ("A=1\0\n", 1, "NUL"),
    ("A=1\nB='\0'\n", 2, "NUL"),
    ("A=1\r\nB=2\r\n", 1, "carriage return"),
    ("A=1\nB=x\\\r\n", 2, "carriage return"),
    ("A=1\n# \r\n", 2, "carriage return"),
    ("A='\x01'\n", 1, "U+0001"),
    ('A="\\\x01\x7f"\n', 1, "U+0001"),
    ("A='\x7f'\n", 1, "U+007F"),
    ("A='\x0b'\n", 1, "U+000B"),
    ("''A=1\n", 1, "command"),
    ("A''=1\n", 1, "command"),
    ('""A=1\n', 1, "command"),
    ("export'' A=1\n", 1, "command"),
    ("A=~\n", 1, "home directory"),
    ("A=~/x\n", 1, "home directory"),
    ("A=~root\n", 1, "home directory"),
    ("A=x:~\n", 1, "home directory"),
    ("A=/a:/b:~/c\n", 1, "home directory"),
    ("export A=~\n", 1, "home directory"),
    ("A='x\ny':~\n", 2, "home directory"),
    ("export A={a,b}\n", 1, "brace"),
    ("export A=x{1..3}\n", 1, "brace"),
    ("A=1 #fine\nB=2 cmd\n", 2, "command"),
]


@pytest.mark.parametrize(("text", "line", "words"), REFUSED)
def test_refused(text: str, line: int, words: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_assignments(text, "/etc/nic")
    assert exc.value.variable == f"/etc/nic:{line}"
    assert words in exc.value.problem
    assert exc.value.exit_status == 2


@pytest.mark.parametrize(
    ("text", "literal_reading", "bash_sets", "bash_runs", "refusal"),
    [
        ("A=~\n", {"A": "~"}, {"A": HOME}, [], "home directory"),
        ("A=x:~\n", {"A": "x:~"}, {"A": f"x:{HOME}"}, [], "home directory"),
        ("export A=x{1,2}\n", {"A": "x{1,2}"}, {"A": "x2"}, [], "brace-expands"),
        ("A=1 B=2 true\n", {"A": "1", "B": "2"}, {}, ["true"], "bash would run it as a command"),
        ("A=1\\\nB=2\n", {"A": "1\\", "B": "2"}, {"A": "1B=2"}, [], None),
    ],
)
def test_naive_reading_would_be_wrong(text: str, literal_reading: dict[str, str], bash_sets: dict[str, str],
                                      bash_runs: list[str], refusal: str | None) -> None:
    """Why the rules exist: reading these files naively gives something other
    than what bash sets. The parser refuses the first four and gets the last
    one (a line continuation) right."""
    run = run_bash(text)
    run.assert_contained()
    assert (run.file_variables, run.ran) == (bash_sets, bash_runs)
    assert bash_sets != literal_reading
    if refusal is None:
        assert parse_assignments(text, "f") == bash_sets
    else:
        with pytest.raises(InvalidInput) as exc:
            parse_assignments(text, "f")
        assert refusal in exc.value.problem


def test_bash_garbles_its_internal_quoting_bytes() -> None:
    """Why control characters are refused: bash 5.2 turns \\<01><7f> inside
    double quotes into \\<01><01> (its CTLESC/CTLNUL markers)."""
    assert bash_source(b'A="\\\x01\x7f"\n') == {"A": "\\\x01\x01"}  # not \\\x01\x7f


def test_bash_brace_expands_export_arguments() -> None:
    """The surprise behind the ``export`` brace rule, pinned down."""
    assert bash_source("export A=x{1,2}\nB={1,2}\n") == {"A": "x2", "B": "{1,2}"}


# --- hypothesis -------------------------------------------------------------------


@given(st.text())
def test_arbitrary_text_only_invalid_input(text: str) -> None:
    try:
        result = parse_assignments(text, "f")
    except InvalidInput as err:
        assert err.variable.startswith("f:")
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in result.items())


shell_text = st.text(alphabet=st.sampled_from("A=1 'x\"\\$`;#~:{}*\n\t()é"), max_size=40)


@given(shell_text)
def test_shell_like_text_only_invalid_input(text: str) -> None:
    try:
        parse_assignments(text, "f")
    except InvalidInput:
        pass


value_chars = st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n")
PLAIN = "abcXYZ019_.,:/@%+-=#!^*?[]"


def quote_single(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def quote_double(text: str) -> str:
    return '"' + "".join("\\" + c if c in '$`"\\' else c for c in text) + '"'


def quote_backslash(text: str) -> str:
    # an escaped newline would be a line continuation: quote it instead
    return "".join("'\n'" if c == "\n" else "\\" + c for c in text)


@st.composite
def encoded_value(draw: st.DrawFn) -> tuple[str, str]:
    """(value, shell text for it) built from safely quoted segments."""
    segments = draw(st.lists(st.text(value_chars, max_size=8), max_size=4))
    parts = []
    for segment in segments:
        style = draw(st.sampled_from(["single", "double", "backslash", "plain"]))
        if style == "plain" and not set(segment) <= set(PLAIN):
            style = "single"
        if style == "single":
            parts.append(quote_single(segment))
        elif style == "double":
            parts.append(quote_double(segment))
        elif style == "backslash":
            parts.append(quote_backslash(segment))
        else:
            parts.append(segment)
    return "".join(segments), "".join(parts)


names = st.from_regex(r"\AV_[A-Za-z0-9_]{0,6}\Z")


@st.composite
def assignment_files(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    """A file of assignments in assorted layouts, and what it must set."""
    expected: dict[str, str] = {}
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        words = []
        for _ in range(draw(st.integers(1, 3))):
            name = draw(names)
            value, text = draw(encoded_value())
            words.append(f"{name}={text}")
            expected[name] = value
        sep = draw(st.sampled_from([" ", "\t", " \\\n  "]))
        line = sep.join(words)
        if draw(st.booleans()):
            line = "export " + line
        if draw(st.booleans()):
            line += " # " + draw(st.text(value_chars, max_size=10)).replace("\n", " ")
        lines.append(line)
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "# comment", "   ", "\t# x"])))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"])), expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assignment_files())
def test_generated_files_agree_with_bash(case: tuple[str, dict[str, str]]) -> None:
    text, expected = case
    assert parse_assignments(text, "gen") == expected
    assert bash_source(text) == expected


# Fragments of shell text, biased towards assignments, with everything bash treats
# specially: expansions, command substitutions, operators, CR and NUL, bare and
# quoted. Bash sees only the files the parser accepts, and sees them in the sandbox:
# a wrongly accepted one makes bash report a command (or a different value), never
# run one.
FRAGMENTS = [
    *"x=1'\"\\\n \t#~:{}*é[?!%-",
    *"$`;&|<>()\r\0",
    "{a,b}",
    "\\\n",
    "\\\\",
    "''",
    '""',
    "'a b'",
    '"c\\"d"',
    "export",
    "A=",
    "B=",
    "$x",
    "${x}",
    "$(x)",
    "`x`",
    "$'x'",
    "$((1))",
    ";x",
    "&&x",
    "|x",
    ">x",
    "<x",
    "(x)",
    " id",
    "\r\n",
    "'$x'",
    "'`x`'",
    "'a;b&c|d<e>f(g)'",
    '"$"',
    '"$x"',
    '"${x}"',
    '"`x`"',
    '"$(x)"',
    "a\\\nb",
    '"\\$x"',
    '"\\`x\\`"',
    '"a;b&c|d<e>f(g)"',
    *(f"\\{c}" for c in "$`;&|<>()"),
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join)
shell_words = st.tuples(
    st.sampled_from(["A=", "B=", "C_1=", "export A=", "export ", "", "# "]), fragment_text
).map("".join)
shell_files = st.lists(st.tuples(shell_words, st.sampled_from([" ", "\n", "\t", " \\\n"])), max_size=6).map(
    lambda pairs: "".join(w + sep for w, sep in pairs)
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shell_files)
def test_whatever_is_accepted_agrees_with_bash(text: str) -> None:
    """The central promise, tested from the other side: any file the parser
    accepts, however odd, means to bash exactly what the parser says, and makes
    bash run nothing."""
    try:
        ours = parse_assignments(text, "f")
    except InvalidInput:
        return
    # Refused whatever bash would make of them: NUL cannot even reach bash (not in
    # a file it sources intact), CR would stay in the value, and bash garbles
    # \x01 and \x7f.
    assert not CONTROL.search(text), f"a control character was accepted: {text!r}"
    assert ours == bash_source(text)


# --- the sandbox itself ------------------------------------------------------------

HOSTILE = """\
touch made
A=$(id) B=`x`
echo hi > out; : >> out2
history -s x; history -w hist
cd /
/bin/touch made2
exec sh -c 'touch pwned'
builtin true; command true; enable true; eval true
. ./x
kill -9 $$
"""


def test_the_sandbox_runs_nothing() -> None:
    """The oracle can be given any text: commands are reported, not run."""
    run = run_bash(HOSTILE)
    run.assert_contained()
    assert run.marks == [] and run.changed == []
    assert run.ran == ["touch", "id", "x", "history", "history", "cd", "exec", "builtin", "command",
                       "enable", "eval", "kill"]
    assert "out: restricted: cannot redirect output" in run.stderr
    assert "/bin/touch: restricted: cannot specify `/' in command names" in run.stderr
    assert run.file_variables == {"A": "", "B": ""}
    if os.geteuid() == 0:
        assert run.variables["EUID"] == str(pwd.getpwnam("nobody").pw_uid)


def test_the_bait_shows_a_command_that_ran() -> None:
    """The check that nothing ran can fail: with an empty PATH bash looks in the
    current directory, and the bait there marks what it ran."""
    run = run_bash("touch made\nA=1\n", path_variable="")
    assert run.marks == ["touch"] and run.ran == []
    assert run.file_variables == {"A": "1"}
    with pytest.raises(AssertionError, match="bait ran"):
        run.assert_contained()
