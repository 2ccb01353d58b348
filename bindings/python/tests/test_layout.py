"""The ctypes mirrors match include/convoy.h: same fields in the same order (parsed from the
header), and the same sizes, alignments and offsets (measured by a C compiler); the enums
and the ABI version match too."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import convoy
from convoy import _lib
from convoy._types import FINISH_REASONS


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _header_structs(header: Path) -> dict:
    """{struct name: [field names in order]} of every `typedef struct { ... } name;`."""
    text = _strip_comments(header.read_text())
    structs = {}
    for body, name in re.findall(r"typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;", text, flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if not decl:
                continue
            m = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl) or re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl)
            assert m, f"cannot parse field declaration {decl!r} in {name}"
            fields.append(m.group(1))
        structs[name] = fields
    return structs


def _header_enum(header: Path, prefix: str) -> dict:
    text = _strip_comments(header.read_text())
    return {k: int(v) for k, v in re.findall(prefix + r"(\w+)\s*=\s*(\d+)", text)}


def test_every_header_struct_is_mirrored_field_for_field(header):
    structs = _header_structs(header)
    mirrored = {c_name: cls for cls, c_name in _lib.C_NAMES.items()}
    assert set(structs) == set(mirrored), "structs in convoy.h vs. ctypes mirrors"
    for c_name, fields in structs.items():
        names = [f[0] for f in mirrored[c_name]._fields_]
        assert names == fields, f"{c_name}: ctypes fields {names} != header fields {fields}"
        assert names[0] == "struct_size"


def test_sizes_and_offsets_match_the_c_compiler(header, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc) found: cannot measure the header's layout")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "convoy.h"', "int main(void) {"]
    for cls, c_name in _lib.C_NAMES.items():
        lines.append(
            f'  printf("{c_name} . %zu %zu\\n", sizeof({c_name}), _Alignof({c_name}));'
        )
        for field, _ in cls._fields_:
            lines.append(
                f'  printf("{c_name} {field} %zu %zu\\n", offsetof({c_name}, {field}), '
                f"sizeof((({c_name} *)0)->{field}));"
            )
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(
        [cc, "-std=c11", "-Wall", "-Werror", f"-I{header.parent}", str(src), "-o", str(exe)],
        check=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    measured = {}
    for line in out.splitlines():
        c_name, field, a, b = line.split()
        measured[(c_name, field)] = (int(a), int(b))
    checked = 0
    for cls, c_name in _lib.C_NAMES.items():
        assert measured[(c_name, ".")] == (ctypes.sizeof(cls), ctypes.alignment(cls)), (
            f"{c_name}: C (sizeof, alignof) {measured[(c_name, '.')]} != ctypes "
            f"{(ctypes.sizeof(cls), ctypes.alignment(cls))}"
        )
        for field, _ in cls._fields_:
            descr = getattr(cls, field)
            assert measured[(c_name, field)] == (descr.offset, descr.size), (
                f"{c_name}.{field}: C (offset, size) {measured[(c_name, field)]} != ctypes "
                f"{(descr.offset, descr.size)}"
            )
            checked += 1
    assert checked > 60


def test_enums_and_abi_version_match_the_header(header):
    assert _header_enum(header, "CONVOY_STATUS_") == {s.name: s.value for s in convoy.Status}
    reasons = _header_enum(header, "CONVOY_FINISH_REASON_")
    assert reasons == {FINISH_REASONS[v].name: v for v in FINISH_REASONS}
    assert _header_enum(header, "CONVOY_BATCH_MODE_") == {m.name: m.value for m in convoy.BatchMode}
    assert _header_enum(header, "CONVOY_WEIGHTS_") == {m.name: m.value for m in convoy.Weights}
    assert _header_enum(header, "CONVOY_EVENT_KIND_") == {
        "TOKEN": _lib.EVENT_KIND_TOKEN,
        "FINISHED": _lib.EVENT_KIND_FINISHED,
    }
    abi = re.search(r"#define\s+CONVOY_ABI_VERSION\s+(\d+)", header.read_text())
    assert abi and int(abi.group(1)) == convoy.ABI_VERSION


def test_every_header_function_has_a_prototype(header):
    text = _strip_comments(header.read_text())
    functions = set(re.findall(r"\b(convoy_\w+)\s*\(", text)) - {"convoy_log_callback"}
    # Macros and typedef'd callback names are not functions.
    functions -= {"CONVOY_HAS_FIELD"}
    assert functions == set(_lib._PROTOTYPES), "functions in convoy.h vs. ctypes prototypes"


def test_the_loaded_library_matches_the_header(header):
    version = re.search(r'#define\s+CONVOY_VERSION\s+"([^"]+)"', header.read_text())
    assert version and convoy.version() == version.group(1)
    assert convoy.abi_version() == convoy.ABI_VERSION
    assert convoy.status_str(convoy.Status.BUSY)
    for cls in _lib.C_NAMES:
        assert cls._fields_[0] == ("struct_size", ctypes.c_uint32)
