"""parse_assignments against the real thing: every accepted sample is also sourced
by bash, and both must agree on every variable and value."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nichooks.errors import InvalidInput
from nichooks.shellvars import parse_assignments

BASH = shutil.which("bash") or "/bin/bash"
ENV = shutil.which("env") or "/usr/bin/env"

# Files the glob samples would match if bash globbed assignment values.
GLOB_BAIT = ("A=x", "E=zz", "G=abc", "G=a[b]", "abc", "x1")


def bash_source(path: Path, cwd: Path) -> dict[str, str]:
    """The variables bash sets when sourcing ``path`` (with ``set -a`` so that
    every assignment reaches ``env``), minus those bash sets by itself."""

    def run(file: str) -> dict[str, str]:
        script = f'set -a; source "$1" || exit 99; exec {ENV} -0'
        proc = subprocess.run(
            [BASH, "--norc", "--noprofile", "-c", script, "bash", file],
            env={},
            cwd=cwd,
            capture_output=True,
            check=False,
        )
        assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode(errors="replace")
        result = {}
        for item in proc.stdout.split(b"\0"):
            if item:
                key, _, value = item.partition(b"=")
                result[os.fsdecode(key)] = os.fsdecode(value)
        return result

    baseline = run(os.devnull)
    return {k: v for k, v in run(str(path)).items() if k not in baseline}


def both(text: str, tmp: Path) -> tuple[dict[str, str], dict[str, str]]:
    for name in GLOB_BAIT:
        (tmp / name).touch()
    path = tmp / "nicfile"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return parse_assignments(text, str(path)), bash_source(path, tmp)


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
def test_agrees_with_bash(name: str, tmp_path: Path) -> None:
    ours, bash = both(ACCEPTED[name], tmp_path)
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
    ("text", "literal_reading"),
    [
        ("A=~\n", {"A": "~"}),
        ("A=x:~\n", {"A": "x:~"}),
        ("export A=x{1,2}\n", {"A": "x{1,2}"}),
        ("A=1 B=2 true\n", {"A": "1", "B": "2"}),
        ("A=1\\\nB=2\n", {"A": "1\\", "B": "2"}),
    ],
)
def test_naive_reading_would_be_wrong(text: str, literal_reading: dict[str, str], tmp_path: Path) -> None:
    """Why the rules exist: reading these files naively gives something other
    than what bash sets. The parser refuses the first four and gets the last
    one (a line continuation) right."""
    path = tmp_path / "f"
    path.write_text(text)
    bash = bash_source(path, tmp_path)
    assert bash != literal_reading
    try:
        assert parse_assignments(text, "f") == bash
    except InvalidInput:
        pass


def test_bash_garbles_its_internal_quoting_bytes(tmp_path: Path) -> None:
    """Why control characters are refused: bash 5.2 turns \\<01><7f> inside
    double quotes into \\<01><01> (its CTLESC/CTLNUL markers)."""
    path = tmp_path / "f"
    path.write_bytes(b'A="\\\x01\x7f"\n')
    assert bash_source(path, tmp_path) == {"A": "\\\x01\x01"}  # not \\\x01\x7f


def test_bash_brace_expands_export_arguments(tmp_path: Path) -> None:
    """The surprise behind the ``export`` brace rule, pinned down."""
    path = tmp_path / "f"
    path.write_text("export A=x{1,2}\nB={1,2}\n")
    assert bash_source(path, tmp_path) == {"A": "x2", "B": "{1,2}"}


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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gen"
        path.write_bytes(text.encode("utf-8"))
        assert bash_source(path, Path(tmp)) == expected


# Fragments of shell text, biased towards assignments. With this alphabet the
# worst a wrongly accepted file could make bash run is a command named like "x".
FRAGMENTS = [
    *"x=1'\"\\\n \t#~:{}*é[?!%-",
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
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join)
shell_words = st.tuples(
    st.sampled_from(["A=", "B=", "C_1=", "export A=", "export ", "", "# "]), fragment_text
).map("".join)
shell_files = st.lists(st.tuples(shell_words, st.sampled_from([" ", "\n", "\t", " \\\n"])), max_size=6).map(
    lambda pairs: "".join(w + sep for w, sep in pairs)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shell_files)
def test_whatever_is_accepted_agrees_with_bash(text: str) -> None:
    """The central promise, tested from the other side: any file the parser
    accepts, however odd, means to bash exactly what the parser says."""
    try:
        ours = parse_assignments(text, "f")
    except InvalidInput:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in GLOB_BAIT:
            (Path(tmp) / name).touch()
        path = Path(tmp) / "f"
        path.write_bytes(text.encode("utf-8"))
        assert ours == bash_source(path, Path(tmp))
